"""KV-cached batched generation for model.Llama: sampling, prefill and decode, continuous batching.

Read top to bottom: sampling (config and small pure helpers), prefill and the decode step
(eager, or compiled over a static cache), continuous batching over many prompts, chat
conversations and the command line. Stage 2 of the method, which runs this over a data set,
is augment.py.

    python generate.py --model DIR --prompt "How are you?"                 # streamed reply

Continuous batching: up to --batch-size rows decode together, one token each per step. Each
row owns its cache slots (slot = position, see model.KVCache) and its attention mask, so a row
gets exactly the tokens it would get alone, and the places of finished rows go to the next
waiting prompts: the batch stays nearly full until the prompts run out, instead of waiting for
its longest reply. New prompts are prefilled together (right-padded) and inserted into the
cache, once an eighth of the batch is free, so that one prefill serves several of them.

References: gpt-fast generate.py (static cache, prefill / decode_one_token split),
Holtzman et al. 2020 (nucleus / top-p sampling), Hugging Face `generate` (the semantics
of temperature, top-k and top-p that our tests compare against).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
from data import DEFAULT_REASONING_TOKENS
from model import KVCache, Llama
from tokenizer import Tokenizer
from runtime import DTYPES, one_line_errors, option, parse_config, resolve_device_dtype


# ----------------------------------------------------------------------------- sampling

@dataclass
class SamplingConfig:
    max_new_tokens: int = DEFAULT_REASONING_TOKENS
    temperature: float = 0.0   # 0 = greedy (argmax)
    top_k: int = 0             # keep the k most likely tokens; 0 = off (1 = greedy)
    top_p: float = 1.0         # keep the smallest set of tokens with this much mass; 1.0 = off
    seed: int = 0              # with (seed, row key) each row has its own random stream

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def row_uniforms(keys, cfg: SamplingConfig) -> torch.Tensor:
    """(B, max_new_tokens) uniforms in [0, 1): row b's stream depends only on (seed, keys[b]).

    One shared generator would make a row's tokens depend on which rows share its batch;
    numpy's SeedSequence turns (seed, key) into independent streams, so a prompt draws the
    same numbers whatever batch it lands in, and a seed reproduces a run exactly."""
    draws = [np.random.default_rng([cfg.seed, key]).random(cfg.max_new_tokens) for key in keys]
    return torch.tensor(np.stack(draws), dtype=torch.float32)


def sample(logits: torch.Tensor, u: torch.Tensor | None, cfg: SamplingConfig) -> torch.Tensor:
    """Next token per row (B,) from logits (B, V) and one uniform per row u (B,) (None: greedy).

    Inverse-CDF sampling: the token is where u falls in the cumulative distribution of the
    kept tokens, so a row's choice depends on its own logits and its own u only."""
    if cfg.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)              # (B, V)
    k = min(cfg.top_k or probs.size(-1), probs.size(-1))
    probs, tokens = probs.topk(k, dim=-1)                                         # (B, k), most likely first
    if cfg.top_p < 1.0:
        probs = probs / probs.sum(-1, keepdim=True)  # top-p applies to what top-k kept, as in HF
        # Drop a token once the tokens before it already reach top_p: the first always stays.
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= cfg.top_p, 0.0)
    cdf = probs.cumsum(-1)                                                        # (B, k), unnormalised
    choice = torch.searchsorted(cdf, u[:, None].to(cdf) * cdf[:, -1:])           # (B, 1)
    return tokens.gather(-1, choice).squeeze(-1)


# ----------------------------------------------------------------------------- prefill and decode

def prefill(model: Llama, prompts: list[list[int]]) -> tuple[torch.Tensor, KVCache]:
    """Run the prompts once, right-padded, into a new cache just long enough for them (to be
    inserted into the decoding batch's cache); returns each row's next-token logits (B, V)
    and the cache."""
    device = model.embed_tokens.weight.device
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    cache = model.new_cache(B, T)
    h = model.hidden_states(ids.to(device), cache)                      # (B, T, d)
    logits = model.lm_head(h[torch.arange(B, device=device), lengths - 1])   # each row's last real token
    cache.advance(T, lengths)
    return logits, cache


def decode_one_token(model: Llama, tokens, cache) -> torch.Tensor:
    """Feed one token per row (B,) after what the cache holds; next-token logits (B, V)."""
    logits = model(tokens[:, None], cache=cache)[:, -1]
    cache.advance(1)
    return logits


@dataclass(frozen=True)
class Decoder:
    """How generation runs its decode steps: step(model, tokens, cache) -> logits, over caches
    that are static (read whole every step, the batch keeps its size) or not."""
    step: Callable = decode_one_token
    static: bool = False


EAGER = Decoder()


def compiled_decoder(device="cuda") -> Decoder:
    """A torch.compile'd decode step (inductor) over static caches: every step has the same
    shapes and compiles once. On CUDA each step is then replayed as one CUDA graph (what
    "reduce-overhead" does), instead of launching its hundreds of small kernels one by one; on
    a CPU a C++ wrapper calls the generated kernels with no Python in between."""
    on_gpu = str(device).startswith("cuda")
    if not on_gpu and not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")):
        raise RuntimeError("--compile on a CPU needs a C++ compiler (g++ or clang++, or one named by $CXX): "
                           "inductor writes the decode step as C++")
    options = {"triton.cudagraphs": True} if on_gpu else {"cpp_wrapper": True}
    compiled = torch.compile(decode_one_token, options=options, dynamic=False)

    def step(model, tokens, cache):
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are no longer used
        return compiled(model, tokens, cache)

    return Decoder(step, static=True)


# ----------------------------------------------------------------------------- continuous batching

@torch.inference_mode()
def generate_stream(model: Llama, prompts: list[list[int]], stop_ids, cfg: SamplingConfig,
                    batch_size: int = 32, keys=None, on_token=None, decoder: Decoder = EAGER):
    """Yield (index, result) for every prompt as it finishes, result = dict of ids (without the
    stop id), n_tokens and hit_limit (max_new_tokens reached without a stop id).

    Continuous batching: batch_size rows decode together, one token per step; the places of
    finished rows go to the next waiting prompts (prefilled together, then inserted into the
    cache) as soon as an eighth of the batch is free, so the batch stays nearly full until the
    prompts run out; then finished rows are dropped. Prompts enter shortest first.
    keys: one int per prompt naming its random stream (default: its index).
    on_token(index, token) is called for every reply token as it comes. decoder: how each
    decode step runs (EAGER, or compiled_decoder's)."""
    check_prompts(prompts, batch_size)
    if not prompts:
        return
    device = model.embed_tokens.weight.device
    keys = list(range(len(prompts))) if keys is None else list(keys)
    waiting = deque(sorted(range(len(prompts)), key=lambda i: len(prompts[i])))
    max_len = max(len(p) for p in prompts) + cfg.max_new_tokens
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long)

    def admit(n):
        """Prefill the next n waiting prompts: their indices, logits, cache and random draws."""
        new = [waiting.popleft() for _ in range(min(n, len(waiting)))]
        logits, cache = prefill(model, [prompts[i] for i in new])
        u = None if cfg.greedy else row_uniforms([keys[i] for i in new], cfg).to(device)
        return new, logits, cache, u

    # Rows that finish wait, idle, until an eighth of the batch is free: one prefill then serves
    # them all (on a GPU a prefill costs about a decode step, whatever its number of rows).
    refill_at = max(1, batch_size // 8)
    first, logits, new_cache, u = admit(batch_size)
    cache = model.new_cache(len(first), max_len, static=decoder.static)
    cache.insert(torch.arange(len(first), device=device), new_cache)
    rows = first              # the prompt each batch row works on; None: an idle row
    replies = {i: [] for i in rows}
    while any(i is not None for i in rows):
        # One token for every row, each from its own random stream at its own step.
        u_now = None if u is None else u.gather(1, torch.tensor(
            [len(replies[i]) if i is not None else 0 for i in rows], device=device)[:, None]).squeeze(1)
        tokens = sample(logits, u_now, cfg)
        for b, i, result in take_tokens(rows, replies, tokens.cpu(), stop, cfg.max_new_tokens, on_token):
            rows[b] = None                              # idle until a waiting prompt takes its place
            yield i, result
        if any(i is not None for i in rows):
            logits = decoder.step(model, tokens, cache)  # finished rows' logits are replaced or unused
        idle = [b for b, i in enumerate(rows) if i is None]
        if waiting and len(idle) >= min(refill_at, len(rows)):  # new prompts take the idle rows' places
            new, new_logits, new_cache, new_u = admit(len(idle))
            places = torch.tensor(idle[:len(new)], device=device)
            cache.insert(places, new_cache)
            logits = logits.index_copy(0, places, new_logits)
            u = None if u is None else u.index_copy(0, places, new_u)
            for b, i in zip(idle, new):
                rows[b], replies[i] = i, []
        if not waiting and None in rows and not decoder.static and any(i is not None for i in rows):
            # Nothing waits: drop the idle rows, so that they stop costing compute.
            keep = torch.tensor([b for b, i in enumerate(rows) if i is not None], device=device)
            rows, logits, u = [i for i in rows if i is not None], logits[keep], None if u is None else u[keep]
            cache.select(keep)


def check_prompts(prompts: list[list[int]], batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")


def take_tokens(rows: list, replies: dict, tokens: torch.Tensor, stop: torch.Tensor, max_new_tokens: int,
                on_token=None):
    """Append each busy row's new token (B,) to its reply, unless it is a stop id; yield
    (batch row, prompt index, result) for every row whose reply is now finished."""
    is_stop = torch.isin(tokens, stop).tolist()     # tokens are on the host: the one sync per step
    for b, (i, token, stopped) in enumerate(zip(rows, tokens.tolist(), is_stop)):
        if i is None:
            continue
        if not stopped:                             # the stop id itself is not part of the reply
            replies[i].append(token)
            if on_token is not None:
                on_token(i, token)
        if stopped or len(replies[i]) == max_new_tokens:
            ids = replies.pop(i)
            yield b, i, {"ids": ids, "n_tokens": len(ids), "hit_limit": not stopped}


def generate_ids(model: Llama, prompts: list[list[int]], stop_ids, cfg: SamplingConfig,
                 batch_size: int = 32, progress: bool = False, keys=None, decoder: Decoder = EAGER) -> list[dict]:
    """Replies to token-id prompts, in input order: generate_stream's results. keys, decoder: see there."""
    results = [None] * len(prompts)
    start, n_tokens = time.time(), 0
    bar = tqdm(total=len(prompts), unit="row", disable=not progress, desc="generate")
    for i, r in generate_stream(model, prompts, stop_ids, cfg, batch_size, keys, decoder=decoder):
        results[i] = r
        n_tokens += r["n_tokens"]
        bar.set_postfix_str(f"{n_tokens / (time.time() - start):.0f} tok/s", refresh=False)
        bar.update(1)  # redraws at most every tqdm.mininterval, although rows finish one by one
    bar.close()
    return results


def generate(model: Llama, tokenizer, conversations: list[list[dict]], cfg: SamplingConfig,
             batch_size: int = 32, progress: bool = True, decoder: Decoder = EAGER) -> list[dict]:
    """The assistant's reply to each conversation (a list of {"role", "content"} messages), in
    input order: dicts of text, n_tokens and hit_limit."""
    prompts = [tokenizer.render(messages, add_generation_prompt=True)[0] for messages in conversations]
    results = generate_ids(model, prompts, tokenizer.stop_ids, cfg, batch_size, progress, decoder=decoder)
    return [{"text": tokenizer.decode(r["ids"]), "n_tokens": r["n_tokens"], "hit_limit": r["hit_limit"]}
            for r in results]


def stream_reply(model: Llama, tokenizer, messages: list[dict], cfg: SamplingConfig, out=None,
                 decoder: Decoder = EAGER) -> dict:
    """Generate one reply, writing it to `out` (default stdout) as it is produced; returns
    generate_stream's result."""
    out = out or sys.stdout
    prompt = tokenizer.render(messages, add_generation_prompt=True)[0]
    ids, shown = [], ""

    def show(_row, token):
        # Decode the whole reply so far and print what is new: decoding token by token would
        # split multi-byte characters and lose the spacing rules of the tokenizer.
        nonlocal shown
        ids.append(token)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):                 # wait for the rest of a multi-byte character
            out.write(text[len(shown):])
            out.flush()
            shown = text

    [(_, result)] = generate_stream(model, [prompt], tokenizer.stop_ids, cfg, on_token=show, decoder=decoder)
    out.write(tokenizer.decode(result["ids"])[len(shown):] + "\n")
    out.flush()
    return result


# ----------------------------------------------------------------------------- command line

@dataclass(kw_only=True)
class GenerationFlags:
    """The sampling, device and compile flags that generate.py and augment.py share."""
    max_new_tokens: int = option(SamplingConfig.max_new_tokens, "reply length cap")
    temperature: float = option(SamplingConfig.temperature, "0 = greedy")
    top_k: int = option(SamplingConfig.top_k, "sample among the k most likely tokens (0 = off)")
    top_p: float = option(SamplingConfig.top_p, "nucleus sampling mass (1.0 = off)")
    seed: int = option(SamplingConfig.seed, "seed of the sampling streams")
    device: str = option("", "cuda, cuda:N or cpu; empty: cuda if available, else cpu (under torchrun: the GPU "
                         "LOCAL_RANK)")
    dtype: str = option("", "fp32, bf16 or fp16; empty: bf16 on cuda, fp32 on cpu", choices=("", *DTYPES))
    compile: bool = option(False, "torch.compile the decode step (for GPU)")

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.seed)


@dataclass(kw_only=True)
class ChatFlags(GenerationFlags):
    model: str = field(metadata={"help": "checkpoint folder (or hub id) with tokenizer files"})
    prompt: str = field(metadata={"help": "one user message; the reply is printed as it is generated"})
    system: str = option("", "system message")


def main(argv=None):
    args = parse_config(ChatFlags, argv, "Chat with a model: one user message, the reply streamed as it is "
                                         "generated. Defaults are greedy decoding (deterministic, reproducible). "
                                         "Stage 2 is augment.py.")
    with one_line_errors("generate.py"):
        device, dtype = resolve_device_dtype(args.device or None, args.dtype or None)
        folder = checkpoint.resolve_checkpoint(args.model)
        model = checkpoint.load_model(folder, dtype, device).eval()
        tokenizer = Tokenizer(folder)
        decoder = compiled_decoder(device) if args.compile else EAGER
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        stream_reply(model, tokenizer, messages + [{"role": "user", "content": args.prompt}], args.sampling(),
                     decoder=decoder)


if __name__ == "__main__":
    main()
