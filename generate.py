"""KV-cached batched generation for model.Llama, and stage 2 of the method: reasoning augmentation.

Read top to bottom: sampling (config and small pure helpers), prefill and the decode step,
continuous batching over many prompts, chat conversations, stage 2 (resumable jsonl writing)
and the command line.

    python generate.py --model DIR --prompt "How are you?"                 # streamed reply
    python generate.py --model DIR --task rgen --data SRC --split train --out aug.jsonl
    torchrun --nproc-per-node 4 generate.py --model DIR --task rgen --data SRC --split train --out aug.jsonl

Stage 2 under torchrun: the rows still to do are dealt out to the ranks (rank r of N takes every
N-th of them in length order), rank r writes aug.jsonl.part-r, and rank 0 merges the parts into
aug.jsonl at the end. A rerun, on any number of ranks, first merges what an interrupted run left
and skips every id already written; a row's tokens do not depend on its batch or rank, so the
file is the one a single process writes (rows in another order).

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

import argparse
import json
import os
import shutil
import sys
import time
import zlib
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
from data import DEFAULT_REASONING_TOKENS, settings_path, write_atomic, write_json
from model import KVCache, Llama
from runtime import DTYPES, all_sum, barrier, distributed, rank_and_world, resolve_device_dtype


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
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
        mask[b, :len(p)] = 1
    cache = model.new_cache(B, T)
    mask = mask.to(device)
    logits = model(ids.to(device), mask, cache=cache, last_only=True)[:, -1]
    cache.advance(T, mask.sum(1))
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
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
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
        tokens_cpu = tokens.cpu()                       # the one host sync per step
        is_stop = torch.isin(tokens_cpu, stop).tolist()
        for b, (i, token, stopped) in enumerate(zip(rows, tokens_cpu.tolist(), is_stop)):
            if i is None:
                continue
            if not stopped:                             # the stop id itself is not part of the reply
                replies[i].append(token)
                if on_token is not None:
                    on_token(i, token)
            if stopped or len(replies[i]) == cfg.max_new_tokens:
                ids = replies.pop(i)
                rows[b] = None                          # idle until a waiting prompt takes its place
                yield i, {"ids": ids, "n_tokens": len(ids), "hit_limit": not stopped}
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
            rows = [i for i in rows if i is not None]
            cache.select(keep)
            logits = logits[keep]
            u = None if u is None else u[keep]


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


# ----------------------------------------------------------------------------- stage 2: augmentation

def rgen_prompt(tokenizer, row: dict) -> list[int]:
    """The rgen prompt for an emotion row, built by the same function that training uses."""
    import data as data_lib
    messages = data_lib.prompt_messages("rgen", data_lib.emotion_as_rgen(row))
    return tokenizer.render(messages, add_generation_prompt=True)[0]


def augment_rows(model: Llama, tokenizer, rows: list[dict], cfg: SamplingConfig, batch_size: int = 32,
                 decoder: Decoder = EAGER):
    """Yield an output row (id, text, label, reasoning, n_tokens, hit_limit) for every emotion
    row, as each finishes (continuous batching: see generate_stream)."""
    prompts = [rgen_prompt(tokenizer, row) for row in rows]
    # Random streams keyed by row id: a resumed or sharded run samples what a whole run would.
    keys = [zlib.crc32(str(row["id"]).encode()) for row in rows]
    for i, r in generate_stream(model, prompts, tokenizer.stop_ids, cfg, batch_size, keys, decoder=decoder):
        row = rows[i]
        yield {"id": row["id"], "text": row["text"], "label": row["label"],
               "reasoning": tokenizer.decode(r["ids"]).strip(), "n_tokens": r["n_tokens"], "hit_limit": r["hit_limit"]}


def complete_lines(path) -> list[tuple[object, str]]:
    """(id, line) of every row of the jsonl at path (none if it does not exist). A last line
    without its newline was torn by a crash mid-write: it is cut off, so that its row is
    generated again."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1                          # 0 when there is no complete line
    if end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
    rows = []
    for n, line in enumerate(raw[:end].decode("utf-8").splitlines(), 1):
        try:
            rows.append((json.loads(line)["id"], line))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}: line {n} is not a json row with an 'id'") from None
    return rows


def done_ids(path) -> set:
    """Ids already in the jsonl at path (empty if none); a torn last line is cut off (complete_lines)."""
    return {row_id for row_id, _ in complete_lines(path)}


class JsonlAppender:
    """Appends rows to a jsonl file as they come. Each row goes to the operating system at once
    (write + flush), so a process that is killed loses no row it finished; every sync_every rows,
    and at the end, they are forced to disk (fsync), so even a machine crash loses few. A kill
    mid-write leaves a torn last line, which complete_lines cuts off on the next run."""

    def __init__(self, path, sync_every: int = 32):
        self.file, self.sync_every, self.unsynced = open(path, "a", encoding="utf-8"), sync_every, 0

    def write(self, row: dict):
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()
        self.unsynced += 1
        if self.unsynced >= self.sync_every:
            self.sync()

    def sync(self):
        os.fsync(self.file.fileno())
        self.unsynced = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sync()
        self.file.close()


def part_path(out_path, rank: int, world: int) -> Path:
    """Where a rank appends its rows: out_path itself in a single process, out_path.part-RANK under torchrun."""
    out_path = Path(out_path)
    return out_path if world == 1 else out_path.with_name(f"{out_path.name}.part-{rank}")


def part_files(out_path) -> list[Path]:
    out_path = Path(out_path)
    prefix = out_path.name + ".part-"
    parts = [p for p in out_path.parent.iterdir() if p.name.startswith(prefix) and p.name[len(prefix):].isdigit()]
    return sorted(parts, key=lambda p: int(p.name[len(prefix):]))


def merge_parts(out_path):
    """Fold every part file into out_path, each id once, and remove the parts; repair a torn
    last line of out_path. A crash at any point leaves each row in out_path or a part (or
    both: hence the check for ids already taken), and the next merge completes the job."""
    out_path = Path(out_path)
    lines = complete_lines(out_path)
    parts = part_files(out_path)
    if not parts:
        return
    taken = {row_id for row_id, _ in lines}
    for part in parts:
        for row_id, line in complete_lines(part):
            if row_id not in taken:
                taken.add(row_id)
                lines.append((row_id, line))
    write_atomic(out_path, "".join(line + "\n" for _, line in lines))
    for part in parts:
        part.unlink()


def check_meta(out_path, meta: dict, force: bool):
    """Refuse to resume out_path (or its part files) with other settings than those in its
    sidecar, unless force; then (re)write the sidecar."""
    out_path = Path(out_path)
    meta_path = settings_path(out_path)
    if (out_path.exists() or part_files(out_path)) and not force:
        if not meta_path.is_file():
            raise ValueError(f"{out_path}: exists without {meta_path.name}, so its settings are unknown; "
                             f"use --force to resume it anyway, or another --out")
        try:
            old = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}: not valid JSON ({e}); use --force to rewrite it") from None
        diff = [f"{k}={old.get(k)!r} (now {v!r})" for k, v in meta.items() if old.get(k) != v]
        if diff:
            raise ValueError(f"{out_path}: was generated with {', '.join(diff)}; "
                             f"use --force to resume it anyway, or another --out")
    write_json(meta_path, meta)


def augment(model_dir, data, split, out_path, cfg: SamplingConfig | None = None, batch_size: int = 32,
            limit: int | None = None, force: bool = False, device=None, dtype=None, rows=None,
            compile: bool = False) -> dict:
    """Stage 2: write a reasoning for every emotion row of data/split (or of `rows`, when given)
    to out_path (jsonl: id, text, label, reasoning, n_tokens, hit_limit). Resumable: rows whose
    id is already in out_path are skipped. Returns (and prints) a summary.

    In a process group (torchrun), every rank calls this: rank r of N generates every N-th of
    the remaining rows into out_path.part-r, and rank 0 merges the parts into out_path (see the
    module docstring); the summary counts the rows of all ranks."""
    import data as data_lib
    cfg = cfg or SamplingConfig()
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    source = data if rows is None else "rows"
    local_source = Path(str(source)).expanduser()
    rows = data_lib.read_emotion(data, split) if rows is None else rows
    rows = rows[:limit] if limit else rows
    seen = set()
    for row in rows:
        if row["id"] in seen:
            raise ValueError(f"{source}: id {row['id']!r} appears more than once")
        seen.add(row["id"])

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rank, world = rank_and_world()
    device, dtype = resolve_device_dtype(device, dtype)
    local = Path(model_dir).expanduser()
    # The source and split too: ids 0..1999 exist in the train split and in the validation split.
    meta = {"model": str(local.resolve()) if local.is_dir() else str(model_dir), "task": "rgen",
            "data": str(local_source.resolve()) if local_source.exists() else str(source), "split": split,
            "prompt_version": data_lib.PROMPT_VERSION, **asdict(cfg)}
    check_meta(out_path, meta, force)  # on every rank, so that all stop alike on a refusal
    barrier()                  # all checked the files as they were
    if rank == 0:
        merge_parts(out_path)  # the rows an interrupted run left in part files, whatever its rank count
    barrier()                  # all read the merged file, before any writes
    done = done_ids(out_path)
    # The prompt is a fixed template around the text, so the text's length orders the prompts.
    # Every rank sorts the same rows, and dealing them out in turn gives each rank the same mix
    # of lengths.
    todo = sorted((row for row in rows if row["id"] not in done), key=lambda row: len(row["text"]))
    mine, part = todo[rank::world], part_path(out_path, rank, world)

    summary = {"out": str(out_path), "rows": 0, "skipped": len(rows) - len(todo), "tokens": 0,
               "hit_limit": 0, "empty": 0}
    start = time.time()
    if mine:  # a finished file needs no model
        folder = checkpoint.resolve_checkpoint(model_dir)  # a hub id is downloaded once
        model = checkpoint.load_model(folder, dtype, device).eval()
        tokenizer = data_lib.Tokenizer(folder)
        decoder = compiled_decoder(device) if compile else EAGER
    bar = tqdm(total=len(mine), unit="row", desc="augment" if world == 1 else f"augment (rank 0 of {world})",
               disable=rank > 0)  # under torchrun, rank 0's share stands for the progress of all
    with JsonlAppender(part, sync_every=batch_size) as out:
        for row in augment_rows(model, tokenizer, mine, cfg, batch_size, decoder) if mine else ():
            out.write(row)  # as soon as it finishes: a kill loses only the rows in flight
            summary["rows"] += 1
            summary["tokens"] += row["n_tokens"]
            summary["hit_limit"] += row["hit_limit"]
            summary["empty"] += not row["reasoning"]
            bar.set_postfix_str(f"{summary['tokens'] / (time.time() - start):.0f} tok/s", refresh=False)
            bar.update(1)
    bar.close()
    if world > 1:
        counts = ("rows", "tokens", "hit_limit", "empty")
        totals = all_sum([summary[k] for k in counts], device)  # also waits for every rank to finish its part
        summary.update({k: int(v) for k, v in zip(counts, totals)})
        if rank == 0:
            merge_parts(out_path)
        barrier()              # the merged file is whole when any rank returns
    summary["seconds"] = round(time.time() - start, 2)
    if rank == 0:
        print(f"augment: wrote {summary['rows']} rows to {out_path} ({summary['skipped']} were already there), "
              f"{summary['tokens']} tokens, {summary['hit_limit']} hit the {cfg.max_new_tokens}-token limit, "
              f"{summary['empty']} empty replies, {summary['seconds']:.1f} s")
    return summary


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    p = argparse.ArgumentParser(
        description="Chat with a model (--prompt, reply streamed) or run stage 2 (--task rgen: "
                    "a reasoning for every emotion row, written to --out as resumable jsonl).",
        epilog=f"Defaults are greedy decoding (deterministic, reproducible) and max_new_tokens "
               f"{SamplingConfig.max_new_tokens}, "
               "the stage-2 settings. Rerun a stage-2 command to resume it. Stage 2 runs on N GPUs as "
               "'torchrun --nproc-per-node N generate.py --task rgen ...': each rank writes OUT.part-RANK, "
               "merged into OUT at the end; a rerun resumes on any number of ranks.")
    p.add_argument("--model", required=True, help="checkpoint folder (or hub id) with tokenizer files")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="one user message; the reply is printed as it is generated")
    mode.add_argument("--task", choices=["rgen"], help="stage 2: reasoning augmentation of emotion rows")
    p.add_argument("--system", help="system message for --prompt")
    p.add_argument("--data", help="stage 2: emotion source (folder, file or hub id)")
    p.add_argument("--split", default="train", help="stage 2: split of --data (default train)")
    p.add_argument("--out", help="stage 2: output jsonl; resumed if it exists")
    p.add_argument("--batch-size", type=int, default=32,
                   help="stage 2: rows decoded together; finished rows' places go to the next ones (default 32)")
    p.add_argument("--limit", type=int, help="stage 2: only the first N rows")
    p.add_argument("--force", action="store_true", help="stage 2: resume --out even if its settings differ")
    p.add_argument("--max-new-tokens", type=int, default=SamplingConfig.max_new_tokens,
                   help=f"reply length cap (default {SamplingConfig.max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling streams (default 0)")
    p.add_argument("--device", help="default: cuda if available, else cpu (under torchrun: the GPU LOCAL_RANK)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (for GPU)")
    args = p.parse_args(argv)

    try:
        cfg = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
        if args.task:
            if not args.data or not args.out:
                p.error("--task rgen needs --data and --out")
            with distributed(args.device or "") as device:  # joins torchrun's group, if launched by it
                augment(args.model, args.data, args.split, args.out, cfg, args.batch_size, args.limit,
                        args.force, device, args.dtype, compile=args.compile)
        else:
            import data as data_lib
            device, dtype = resolve_device_dtype(args.device, args.dtype)
            folder = checkpoint.resolve_checkpoint(args.model)
            model = checkpoint.load_model(folder, dtype, device).eval()
            tokenizer = data_lib.Tokenizer(folder)
            decoder = compiled_decoder(device) if args.compile else EAGER
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            stream_reply(model, tokenizer, messages + [{"role": "user", "content": args.prompt}], cfg,
                         decoder=decoder)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # bad input: one line, no traceback
        sys.exit(f"generate.py: {e}")
    except KeyboardInterrupt:
        sys.exit("generate.py: interrupted" + ("; rerun the same command to resume" if args.task else ""))


if __name__ == "__main__":
    main()
