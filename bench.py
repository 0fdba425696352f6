"""Speed and memory of our Llama (model.py, train.py, generate.py) beside transformers'
LlamaForCausalLM: the same weights, the same inputs, one run, one table (and a JSON file).

    python bench.py                              # CPU: a mid-size random config, a reduced grid, a few minutes
    python bench.py --full                       # the whole grid: seq 128/512/2048 x batch 1/8/32
    python bench.py --config config.json         # random weights with a checkpoint's shapes
    python bench.py --model DIR --device cuda    # a real checkpoint on a GPU (bf16): adds MFU and bandwidth share

Every figure is ours beside transformers' and their ratio ours / transformers: the median of
--reps repetitions after --warmup ones. Transformers runs its default attention (sdpa) and its
default cache (DynamicCache), which is what a user would get. The figures:

  train      tokens/s of one optimizer step on B rows of T tokens, every next token a target
             (--target-frac < 1 masks a prompt share, as in SFT: ours then sends only the target
             positions through the output head). Ours: train.collate + train.train_step (loss_sum,
             backward, clip, AdamW); transformers: forward(labels=...) + backward + the same clip
             and AdamW. bf16 means autocast over fp32 master weights on both sides, as in train.py.
  train_mem  peak memory of those steps above the loaded weights (gradients, AdamW state,
             activations). Each side trains in a fresh subprocess of its own; CPU: peak RSS
             (the kernel's high-water mark, reset once the weights are loaded); GPU:
             torch.cuda.max_memory_allocated. Training timings come from the same subprocesses.
  prefill    tokens/s of one forward over B prompts of T tokens into an empty KV cache, last
             position's logits only (ours: generate.prefill, static cache; transformers:
             forward(use_cache=True, logits_to_keep=1)).
  decode     new tokens/s after B prompts of T tokens, greedy: B * (N - 1) / (t(N) - t(1)), where
             t(n) is the wall time to generate n tokens, so prefill is not counted. Ours:
             generate.generate_ids; transformers: generate(do_sample=False, min_new_tokens=N,
             max_new_tokens=N): both produce exactly N tokens per row.
  stage2     rows/s of stage 2 on fixed emotion rows, in batches: ours generate.augment_batch
             (prompts, batching, per-row stops, detokenisation); transformers: the same prompt ids
             (generate.rgen_prompt) left-padded, generate(do_sample=False, eos_token_id=the stop
             ids), then the same detokenisation. Random weights rarely emit a stop id, so rows
             mostly run to --stage2-new-tokens; the JSON counts the tokens each side produced.
  train_mfu  (cuda) train tokens/s x 6N / --peak-flops, N = non-embedding parameters + the head.
  decode_bw  (cuda) batch-1 decode tokens/s x bytes of weights read per token (the same N) /
             --peak-bandwidth: the share of the memory-bandwidth limit.

Inference figures are measured in this process, ours and transformers' repetitions interleaved
(so a busy machine disturbs both alike); training runs in subprocesses, one per side and case.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import data
import generate
import train
from model import Llama, LlamaConfig

# A quarter of Llama-3.2-1B in every width (hidden 2048, MLP 8192, 32/8 heads, vocab 128256), 4 of
# its 16 layers, the same head_dim and llama3 rope scaling: mid-size and CPU-friendly.
DEFAULT_CONFIG = {
    "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": True,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}
# (batch, seq) points of the scaling grid: a cross through (1, 128) by default, everything with --full
GRID_SEQS, GRID_BATCHES = (128, 512, 2048), (1, 8, 32)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint folder: its weights (and tokenizer, if it has one)")
    src.add_argument("--config", help="a config.json: random weights with its shapes (default: DEFAULT_CONFIG, "
                                      "a quarter of Llama-3.2-1B's widths, 4 layers)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    p.add_argument("--batch", type=int, default=8, help="training / prefill rows of the headline figures")
    p.add_argument("--seq", type=int, default=128, help="training / prefill tokens per row of the headline figures")
    p.add_argument("--target-frac", type=float, default=1.0, help="share of each training row that carries a loss")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens of the headline decode figures")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row in decode figures")
    p.add_argument("--stage2-rows", type=int, default=64)
    p.add_argument("--stage2-batch", type=int, default=32)
    p.add_argument("--stage2-new-tokens", type=int, default=32)
    p.add_argument("--grid-seqs", default=",".join(map(str, GRID_SEQS)), help="comma-separated sequence lengths")
    p.add_argument("--grid-batches", default=",".join(map(str, GRID_BATCHES)), help="comma-separated batch sizes")
    p.add_argument("--full", action="store_true", help="every (batch, seq) pair of the grid, and training "
                   "with and without checkpointing there (default: the pairs with the smallest batch or "
                   "the smallest seq, without checkpointing)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions; the median is quoted")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (training: at least 1)")
    p.add_argument("--peak-flops", type=float, default=989e12, help="cuda: peak FLOP/s for MFU (H100 bf16 dense)")
    p.add_argument("--peak-bandwidth", type=float, default=3.35e12, help="cuda: peak memory B/s (H100 SXM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench.json", help="the JSON file written")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one training case in a fresh process
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.warmup = max(args.warmup, 0)
    return args


# ----------------------------------------------------------------------------- models and inputs

def prepare(args, folder: Path) -> tuple[Path, data.Tokenizer]:
    """The checkpoint folder both sides load (with tokenizer files), and its tokenizer."""
    if args.model:
        model_dir = Path(args.model)
        try:
            return model_dir, data.Tokenizer.from_dir(model_dir)
        except FileNotFoundError:  # weights without tokenizer files: build a small one for stage 2
            return model_dir, data.Tokenizer.from_dir(small_tokenizer(folder / "tok"))
    config = LlamaConfig.from_json(args.config) if args.config else LlamaConfig.from_hf(DEFAULT_CONFIG, "DEFAULT_CONFIG")
    tokenizer = data.Tokenizer.from_dir(small_tokenizer(folder / "tok"))
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"vocab_size {config.vocab_size} is smaller than the bench tokenizer's {tokenizer.vocab_size}")
    config.bos_token_id, config.eos_token_id = tokenizer.bos_id, sorted(tokenizer.stop_ids)
    torch.manual_seed(args.seed)
    Llama(config).save_pretrained(folder / "model", tokenizer_dir=folder / "tok")
    return folder / "model", data.Tokenizer.from_dir(folder / "model")


def small_tokenizer(out_dir: Path) -> Path:
    return data.build_tokenizer(emotion_texts(200), out_dir, chat_format="llama3", vocab_size=300)


WORDS = ("i feel so happy today because my friend came home again after the long rain and we "
         "laughed but then the news made me sad angry and a little afraid of what work will bring").split()


def emotion_texts(n: int) -> list[str]:
    """n fixed sentences of 6 to 35 words: stage-2 inputs of varied length."""
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(6 + (i * 11) % 30)) for i in range(n)]


def load(side: str, model_dir: Path, dtype: torch.dtype, device: str):
    if side == "ours":
        return Llama.from_pretrained(model_dir, dtype, device)
    import transformers
    transformers.logging.set_verbosity_error()      # no generation-flag warnings
    transformers.logging.disable_progress_bar()     # no "Loading weights" bar
    return transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)  # default attention: sdpa


def random_ids(batch: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def flop_params(model: Llama) -> int:
    """N of 6N: every parameter but the embedding lookup, plus the output head (tied or not)."""
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embed_tokens"))
    return n + (model.lm_head.weight.numel() if model.config.tie_word_embeddings else 0)


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clock(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict, args) -> dict[str, list[float]]:
    """Seconds per repetition of each side's fn; the sides alternate (and swap who goes first)
    so that a colleague's job landing mid-run slows both alike."""
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    times = {side: [] for side in fns}
    for rep in range(args.reps):
        for side in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
            times[side].append(clock(fns[side], args.device))
    return times


# ----------------------------------------------------------------------------- inference figures

def prefill_fns(ours, hf, ids, device) -> dict:
    mask = torch.ones_like(ids)

    @torch.inference_mode()
    def run_ours():
        generate.prefill(ours, ids, mask, ours.new_cache(*ids.shape))

    @torch.inference_mode()
    def run_hf():
        hf(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)

    return {"ours": run_ours, "transformers": run_hf}


def generate_fns(ours, hf, ids, n_new: int, device) -> dict:
    """Exactly n_new greedy tokens per row on both sides (no stop ids; min_new_tokens for transformers)."""
    prompts = ids.tolist()
    cfg = generate.SamplingConfig(max_new_tokens=n_new)
    mask = torch.ones_like(ids).to(device)
    ids = ids.to(device)

    def run_ours():
        generate.generate_ids(ours, prompts, set(), cfg, batch_size=len(prompts))

    @torch.inference_mode()
    def run_hf():
        hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
                    pad_token_id=0)

    return {"ours": run_ours, "transformers": run_hf}


def decode_rates(ours, hf, ids, args) -> dict[str, list[float]]:
    """New tokens/s per repetition: B * (N - 1) / (t(N) - t(1))."""
    long = generate_fns(ours, hf, ids, args.new_tokens, args.device)
    short = generate_fns(ours, hf, ids, 1, args.device)
    pairs = {side: (lambda side=side: (clock(long[side], args.device), clock(short[side], args.device)))
             for side in long}
    for _ in range(args.warmup):
        for fn in pairs.values():
            fn()
    rates = {side: [] for side in pairs}
    for rep in range(args.reps):
        for side in (list(pairs) if rep % 2 == 0 else list(pairs)[::-1]):
            t_long, t_short = pairs[side]()
            rates[side].append(ids.shape[0] * (args.new_tokens - 1) / max(t_long - t_short, 1e-9))
    return rates


def stage2_fns(ours, hf, tokenizer, args) -> tuple[dict, dict]:
    """Rows as augment() meets them (sorted by text length, cut into batches) for both sides."""
    rows = [{"id": i, "text": t, "label": data.LABELS[i % 6]} for i, t in enumerate(emotion_texts(args.stage2_rows))]
    rows.sort(key=lambda row: len(row["text"]))
    batches = [rows[i:i + args.stage2_batch] for i in range(0, len(rows), args.stage2_batch)]
    cfg = generate.SamplingConfig(max_new_tokens=args.stage2_new_tokens)
    stop = sorted(tokenizer.stop_ids)
    produced = {}

    def run_ours():
        out = [r for batch in batches for r in generate.augment_batch(ours, tokenizer, batch, cfg)]
        produced["ours"] = sum(r["n_tokens"] for r in out)

    @torch.inference_mode()
    def run_hf():
        n_tokens = 0
        for batch in batches:
            prompts = [generate.rgen_prompt(tokenizer, row) for row in batch]
            T = max(map(len, prompts))
            ids = torch.tensor([[tokenizer.pad_id] * (T - len(p)) + p for p in prompts], device=args.device)
            mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=args.device)
            out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=args.stage2_new_tokens,
                              eos_token_id=stop, pad_token_id=tokenizer.pad_id)[:, T:].tolist()
            for reply in out:
                reply = reply[:next((i for i, t in enumerate(reply) if t in stop), len(reply))]
                tokenizer.decode(reply).strip()
                n_tokens += len(reply)
        produced["transformers"] = n_tokens

    return {"ours": run_ours, "transformers": run_hf}, produced


# ----------------------------------------------------------------------------- training figures

def train_case(spec: dict) -> dict:
    """One side's training steps on a fresh process: seconds per step and peak memory above the
    loaded weights. Runs in the --worker subprocess."""
    torch.set_num_threads(spec["threads"])
    device, bf16 = spec["device"], spec["dtype"] == "bf16"
    B, T = spec["batch"], spec["seq"]
    model = load(spec["side"], Path(spec["model_dir"]), torch.float32, device).train()  # fp32 masters
    ids = random_ids(B, T, model.config.vocab_size, spec["seed"])
    is_target = torch.zeros(B, T, dtype=torch.bool)
    is_target[:, T - max(1, round(spec["target_frac"] * T)):] = True
    cfg = train.TrainConfig(task="q2a", data="-", out="-", dtype=spec["dtype"], grad_checkpointing=spec["ckpt"])
    optimizer = train.build_optimizer(model, cfg, torch.device(device))
    if spec["side"] == "ours":
        model.gradient_checkpointing = spec["ckpt"]
        batch = train.collate([train.Example(row, mask) for row, mask in zip(ids, is_target)], pad_id=0).to(device)

        def step():
            return train.train_step(model, optimizer, [batch], cfg.lr, cfg)[0]
    else:
        if spec["ckpt"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        input_ids, labels = ids.to(device), ids.masked_fill(~is_target, -100).to(device)

        def step():  # train.train_step's sequence, with transformers' own loss
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=input_ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss)

    peak = memory_probe(device)
    losses, seconds = [], []
    for i in range(spec["warmup"] + spec["reps"]):
        sync(device)
        t0 = time.perf_counter()
        losses.append(step())
        sync(device)
        if i >= spec["warmup"]:
            seconds.append(time.perf_counter() - t0)
    return {"seconds": seconds, "peak_bytes": peak(), "first_loss": losses[0]}


def memory_probe(device: str):
    """Start measuring peak memory now; the returned function gives the peak above this point."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        return lambda: torch.cuda.max_memory_allocated() - base
    try:  # Linux: writing 5 resets the high-water mark VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        return lambda base=proc_status("VmRSS"): proc_status("VmHWM") - base
    except OSError:  # elsewhere: the lifetime peak, which may include loading
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise KeyError(key)


def run_train_case(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {spec['side']} B={spec['batch']} T={spec['seq']} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the run

def figure(name, unit, ours, theirs, better="higher", **where) -> dict:
    """One row of the table: medians of each side's repetitions and their ratio."""
    o, t = statistics.median(ours), statistics.median(theirs)
    return {"figure": name, **where, "unit": unit, "better": better, "ours": o, "transformers": t,
            "ratio": o / t if t else float("nan"), "ours_reps": list(ours), "transformers_reps": list(theirs)}


def grid_points(args) -> list[tuple[int, int]]:
    seqs = [int(s) for s in args.grid_seqs.split(",") if s]
    batches = [int(b) for b in args.grid_batches.split(",") if b]
    if args.full:
        return [(b, s) for b in batches for s in seqs]
    cross = [(min(batches), s) for s in seqs] + [(b, min(seqs)) for b in batches]
    return sorted(set(cross), key=cross.index)


def machine(args) -> dict:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
            "python": platform.python_version(), "device": args.device, "dtype": args.dtype}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(args.device)
    return info


def run(args) -> dict:
    import transformers
    torch.set_num_threads(args.threads)
    dtype, device = DTYPES[args.dtype], args.device
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        model_dir, tokenizer = prepare(args, Path(tmp))
        ours = load("ours", model_dir, dtype, device).eval()
        hf = load("transformers", model_dir, dtype, device).eval()
        config, vocab = ours.config, ours.config.vocab_size
        check = random_ids(2, 64, vocab, args.seed + 1).to(device)
        with torch.inference_mode():
            logit_diff = (ours(check).float() - hf(check).logits.float()).abs().max().item()
        meta = {"machine": machine(args), "transformers": transformers.__version__,
                "transformers_attention": hf.config._attn_implementation, "transformers_cache": "DynamicCache",
                "model": str(args.model or args.config or "DEFAULT_CONFIG (random weights)"),
                "config": config.to_hf(), "params": ours.num_params(), "flop_params": flop_params(ours),
                "max_abs_logit_diff": logit_diff, "reps": args.reps, "warmup": args.warmup,
                "new_tokens": args.new_tokens, "target_frac": args.target_frac}
        say(f"weights shared: max |logit difference| {logit_diff:.2e}; {args.threads} torch threads")
        figures, cache = [], {}
        n_flop = flop_params(ours)
        bytes_per_token = n_flop * dtype.itemsize  # batch-1 decode reads every weight but the embedding once

        def measured(section, key, measure):
            """Measure each (figure, batch, seq, ...) once; a headline point that is also a grid
            point is quoted twice from one measurement."""
            if key not in cache:
                cache[key] = measure()
            figures.extend({**f, "section": section} for f in cache[key])

        def prefill(section, B, T):
            def measure():
                ids = random_ids(B, T, vocab, args.seed + 2).to(device)
                t = interleaved(prefill_fns(ours, hf, ids, device), args)
                return [figure("prefill", "tokens/s", [B * T / s for s in t["ours"]],
                               [B * T / s for s in t["transformers"]], batch=B, seq=T)]
            measured(section, ("prefill", B, T), measure)

        def decode(section, B, T):
            def measure():
                r = decode_rates(ours, hf, random_ids(B, T, vocab, args.seed + 3), args)
                found = [figure("decode", "tokens/s", r["ours"], r["transformers"], batch=B, seq=T)]
                if B == 1 and device.startswith("cuda"):
                    found.append(figure("decode_bw", "%", *[[100 * x * bytes_per_token / args.peak_bandwidth
                                                             for x in r[side]] for side in r], batch=B, seq=T))
                return found
            measured(section, ("decode", B, T), measure)

        def training(section, B, T, ckpt):
            def measure():  # one fresh subprocess per side; who goes first alternates
                spec = {"model_dir": str(model_dir), "device": device, "dtype": args.dtype, "threads": args.threads,
                        "batch": B, "seq": T, "ckpt": ckpt, "target_frac": args.target_frac,
                        "warmup": max(1, args.warmup), "reps": args.reps, "seed": args.seed + 4}
                sides = ["ours", "transformers"][::1 if len(cache) % 2 == 0 else -1]
                res = {side: run_train_case({**spec, "side": side}) for side in sides}
                o, t = res["ours"], res["transformers"]
                rates = {side: [B * T / s for s in res[side]["seconds"]] for side in res}
                found = [figure("train", "tokens/s", rates["ours"], rates["transformers"], batch=B, seq=T, ckpt=ckpt),
                         figure("train_mem", "MiB", [o["peak_bytes"] / 2**20], [t["peak_bytes"] / 2**20],
                                better="lower", batch=B, seq=T, ckpt=ckpt)]
                found[0]["first_loss"] = {"ours": o["first_loss"], "transformers": t["first_loss"]}
                if device.startswith("cuda"):
                    flops = 6 * n_flop / args.peak_flops
                    found.append(figure("train_mfu", "%", *[[100 * r * flops for r in rates[side]]
                                                           for side in ("ours", "transformers")],
                                        batch=B, seq=T, ckpt=ckpt))
                return found
            measured(section, ("train", B, T, ckpt), measure)

        # headline figures
        say("headline: prefill, decode at batch 1 and 32, stage 2")
        prefill("headline", args.batch, args.seq)
        for B in (1, 32):
            decode("headline", B, args.prompt_len)
        fns, produced = stage2_fns(ours, hf, tokenizer, args)
        t = interleaved(fns, args)
        figures.append(figure("stage2", "rows/s", [args.stage2_rows / s for s in t["ours"]],
                              [args.stage2_rows / s for s in t["transformers"]], section="headline",
                              batch=args.stage2_batch, rows=args.stage2_rows, new_tokens=args.stage2_new_tokens))
        figures[-1]["tokens_produced"] = dict(produced)

        # the grid, inference first (the in-process models), then training (subprocesses)
        points = grid_points(args)
        for B, T in points:
            say(f"grid: prefill and decode at batch {B}, seq {T}")
            prefill("grid", B, T)
            decode("grid", B, T)
        del ours, hf
        for ckpt in (False, True):
            say(f"headline: training at batch {args.batch}, seq {args.seq}, checkpointing {'on' if ckpt else 'off'}")
            training("headline", args.batch, args.seq, ckpt)
        for B, T in points:
            for ckpt in ((False, True) if args.full else (False,)):
                say(f"grid: training at batch {B}, seq {T}" + (", checkpointing" if ckpt else ""))
                training("grid", B, T, ckpt)
    meta["seconds"] = round(time.perf_counter() - started, 1)
    order = ["train", "train_mem", "train_mfu", "prefill", "decode", "decode_bw", "stage2"]
    figures.sort(key=lambda f: (f["section"] != "headline", order.index(f["figure"]), f["batch"],
                                f.get("seq", 0), f.get("ckpt", False)))
    return {"meta": meta, "figures": figures, "targets": targets(figures)}


def targets(figures) -> list[dict]:
    """The issues' targets, reported (never asserted): ratio and whether it was met."""
    def first(name, **where):
        return next(f for f in figures if f["figure"] == name and f["section"] == "headline"
                    and all(f.get(k) == v for k, v in where.items()))

    goals = [("training tokens/s (no checkpointing)", first("train", ckpt=False), 1.0),
             ("training tokens/s (checkpointing)", first("train", ckpt=True), 1.0),
             ("batch-1 decode tokens/s", first("decode", batch=1), 1.5),
             ("batch-32 decode tokens/s", first("decode", batch=32), 1.0)]
    return [{"target": name, "ratio": f["ratio"], "goal": goal, "met": f["ratio"] >= goal} for name, f, goal in goals]


def say(msg: str):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def table(result: dict) -> str:
    m, meta = result["meta"]["machine"], result["meta"]
    c = meta["config"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores{', ' + m['gpu'] if 'gpu' in m else ''}; torch {m['torch']}, "
        f"{m['threads']} threads; device {m['device']}, {m['dtype']}",
        f"model: {meta['model']}: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, mlp "
        f"{c['intermediate_size']}, heads {c['num_attention_heads']}/{c['num_key_value_heads']} kv, head_dim "
        f"{c['head_dim']}, vocab {c['vocab_size']}, {meta['params'] / 1e6:.1f}M params; max |logit diff| "
        f"{meta['max_abs_logit_diff']:.1e}",
        f"transformers {meta['transformers']} LlamaForCausalLM, attention {meta['transformers_attention']}, "
        f"{meta['transformers_cache']}; median of {meta['reps']} after {meta['warmup']} warm-up; "
        f"{meta['new_tokens']} new tokens per decode; {meta['seconds']} s in all",
        "",
        f"{'section':<9} {'figure':<10} {'batch':>5} {'seq':>5} {'ckpt':>4} {'ours':>10} {'transformers':>12} "
        f"{'ours/tf':>8}  unit",
    ]
    for f in result["figures"]:
        ckpt = {True: "on", False: "off"}.get(f.get("ckpt"), "")
        seq = f.get("seq", f"{f.get('rows')}r")
        lines.append(f"{f['section']:<9} {f['figure']:<10} {f['batch']:>5} {seq:>5} {ckpt:>4} {fmt(f['ours']):>10} "
                     f"{fmt(f['transformers']):>12} {f['ratio']:>7.2f}x  {f['unit']}"
                     + ("" if f["better"] == "higher" else " (lower is better)"))
    lines.append("")
    for t in result["targets"]:
        lines.append(f"target {t['target']}: {t['ratio']:.2f}x (goal >= {t['goal']}x) "
                     f"{'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(train_case(json.loads(args.worker))))
        return None
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    say(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
