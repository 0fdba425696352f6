"""Speed and memory of our Llama (model.py, train.py, generate.py, augment.py) beside transformers'
LlamaForCausalLM: the same weights, the same inputs, one run, one table (and a JSON file).

    python bench/bench.py                              # CPU: a mid-size random config, a reduced grid, a few minutes
    python bench/bench.py --full                       # the whole grid: seq 128/512/2048 x batch 1/8/32
    python bench/bench.py --config config.json         # random weights with a checkpoint's shapes
    python bench/bench.py --model DIR --device cuda    # a real checkpoint on a GPU (bf16): adds MFU and bandwidth share
    python bench/bench.py --compile-train              # our training side as train.py --compile runs it

Every figure is ours beside transformers', each the median of --reps repetitions after --warmup
ones (training: --train-reps optimizer steps after --train-warmup), and the ratio ours /
transformers: the median of the per-repetition ratios (the sides' repetitions alternate, so a
burst of other work slows both). "noise" is the wider of the two sides' (max - min) / median.
Transformers runs with its defaults, what a user would get: sdpa attention, DynamicCache, and for
training torch's fused AdamW (its Trainer's default, adamw_torch_fused). The figures:

  train      tokens/s of one optimizer step on B rows of T tokens, every next token a target
             (--target-frac < 1 leaves a prompt share without loss, as in SFT; ours then sends only
             the target positions through the output head). Ours: data.collate + optim.build_optimizer
             + train.train_step (loss_sum, backward, clip, AdamW). Transformers: forward(labels=...),
             backward, the same clipping, AdamW(fused=True) with the same settings. bf16 means autocast
             over fp32 master weights on both sides, as in train.py.
  train_mem  peak memory of those steps above the loaded weights: gradients, AdamW state, activations.
             Each side trains in a fresh subprocess of its own (on CPU the two are stepped in turn);
             CPU: peak RSS (the kernel's high-water mark, reset after loading); GPU:
             torch.cuda.max_memory_allocated.
  prefill    tokens/s of one forward over B prompts of T tokens into an empty KV cache, logits of the
             last position only (ours: generate.prefill; transformers:
             forward(use_cache=True, logits_to_keep=1)).
  decode     new tokens/s after B prompts of T tokens, greedy: B * (N - 1) / (t(N) - t(1)), where t(n)
             is the wall time to generate n tokens, so prefill is not counted. Ours:
             generate.generate_ids; transformers: generate(do_sample=False, min_new_tokens=N,
             max_new_tokens=N). Both produce exactly N tokens per row.
  decode_compiled  batch-1 decode as above, ours with generate.compiled_decoder (torch.compile of the
             decode step over a static cache: inductor, with a C++ wrapper on CPU; on CUDA replayed as a CUDA graph), beside
             transformers' default generate (on this CPU, its static cache with a compiled forward
             measured no faster than its default).
  stage2     rows/s of stage 2 on fixed emotion rows: ours augment.augment_rows (prompts, continuous
             batching, per-row stops, detokenisation); transformers, batch by batch: the same prompt ids
             (augment.rgen_prompt), left-padded, generate(do_sample=False, eos_token_id=the stop ids),
             the same detokenisation. Random weights (no --model) never emit a stop id, so both sides
             also stop at the tokens a free run emits most often, enough of them that replies end at varied
             lengths (median under half of --stage2-new-tokens, as with real reasoning); the JSON
             counts the tokens each side produced.
  train_mfu  (cuda) train tokens/s x 6N / --peak-flops, N = non-embedding parameters + the output head.
  decode_bw  (cuda) batch-1 decode tokens/s x bytes of those N weights / --peak-bandwidth (also for
             decode_compiled).

The table's footer also quotes a measured batch-1 decode limit: one vector times every weight
matrix that a decode step reads, timed in turn with the batch-1 decode runs. Batch-1 decode reads
every weight once per token, so no implementation does much better; the gap to it is overhead.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules, one folder up from here

import torch

import checkpoint
import data
import generate
from checkpoint import resolve_checkpoint
from files import write_json
from measure import (SIDES, decode_fns, emotion_texts, figure, flop_params, interleaved, load, prefill_fns,
                     random_ids, scaled, stage2_fns, train_both, weight_read_fn, worker_main)
from model import Llama
from runtime import default_device
from tokenizer import CHAT_TOKENS, Tokenizer, build_tokenizer

# A quarter of Llama-3.2-1B in every width (hidden 2048, MLP 8192, 32/8 heads, vocab 128256), 4 of
# its 16 layers, the same head_dim and llama3 rope scaling: mid-size and CPU-friendly.
DEFAULT_CONFIG = {
    "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": True,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
START = time.perf_counter()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint folder: its weights (and its tokenizer, if it has one)")
    src.add_argument("--config", help="a config.json: random weights with its shapes (default: DEFAULT_CONFIG, "
                                      "a quarter of Llama-3.2-1B's widths, 4 layers)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", choices=DTYPES, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    p.add_argument("--batch", type=int, default=8, help="rows of the headline training and prefill figures")
    p.add_argument("--seq", type=int, default=128, help="tokens per row of the headline training and prefill figures")
    p.add_argument("--target-frac", type=float, default=1.0, help="share of each training row that carries a loss")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens of the headline decode figures")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row in decode figures")
    p.add_argument("--stage2-rows", type=int, default=256, help="rows of the stage-2 figure (8 batches: the real run has 500)")
    p.add_argument("--stage2-batch", type=int, default=32)
    p.add_argument("--stage2-new-tokens", type=int, default=64)
    p.add_argument("--grid-seqs", default="128,512,2048", help="sequence lengths of the scaling grid")
    p.add_argument("--grid-batches", default="1,8,32", help="batch sizes of the scaling grid")
    p.add_argument("--full", action="store_true", help="every (batch, seq) pair of the grid, training with and "
                   "without checkpointing (default: the pairs on the smallest batch or the smallest seq, "
                   "training without checkpointing)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of inference figures; the median is quoted")
    p.add_argument("--train-reps", type=int, default=5, help="timed optimizer steps per training figure")
    p.add_argument("--train-warmup", type=int, default=3, help="untimed optimizer steps first (at least 1: the "
                   "first allocates the AdamW state; on CPU the next ones are still slow while the allocator "
                   "settles)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--peak-flops", type=float, default=989e12, help="cuda: peak FLOP/s for MFU (H100 bf16 dense)")
    p.add_argument("--peak-bandwidth", type=float, default=3.35e12, help="cuda: peak memory bytes/s (H100 SXM)")
    p.add_argument("--compile-train", action="store_true", help="our training side with train.py --compile "
                   "(each block through torch.compile; the warm-up steps compile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench.json", help="the JSON file written")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one side's training, in a fresh process
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def say(msg: str):
    print(f"bench [{time.perf_counter() - START:4.0f} s]: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- weights and inputs

def prepare(args, folder: Path) -> tuple[Path, Tokenizer]:
    """The checkpoint folder both sides load (with tokenizer files), and its tokenizer."""
    if args.model:
        model_dir = resolve_checkpoint(args.model)  # a folder, or a hub id downloaded once
        try:
            return model_dir, Tokenizer(model_dir)
        except FileNotFoundError:  # weights without tokenizer files: a small one serves stage 2
            config = checkpoint.config_from_json(model_dir / "config.json")
            return model_dir, Tokenizer(small_tokenizer(folder / "tok", config.vocab_size))
    config = checkpoint.config_from_json(args.config) if args.config else checkpoint.config_from_hf(DEFAULT_CONFIG, "DEFAULT_CONFIG")
    tokenizer = Tokenizer(small_tokenizer(folder / "tok", config.vocab_size))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_id, sorted(tokenizer.stop_ids)
    torch.manual_seed(args.seed)
    model = Llama(config)
    with torch.no_grad():  # std 0.05, not 0.02: the replies then vary from token to token as real ones
        for name, p in model.named_parameters():  # do (not one token repeated), so stop ids can end them
            if p.dim() == 2 and not name.startswith("embed_tokens"):
                p.normal_(0.0, 0.05)
    checkpoint.save_model(model, folder / "model", tokenizer.serving_files())
    return folder / "model", Tokenizer(folder / "model")


def small_tokenizer(out_dir: Path, vocab_size: int) -> Path:
    """A byte-level BPE learned on the stage-2 prompts themselves, so that they take about as many
    tokens as with a real tokenizer (one or two per word), within the model's vocabulary."""
    rows = [{"text": t, "label": data.LABELS[i % 6]} for i, t in enumerate(emotion_texts(200))]
    texts = [data.prompt_messages("rgen", data.emotion_as_rgen(row))[0]["content"] for row in rows]
    # build_tokenizer adds the chat format's special tokens after the learned ones: both must fit
    learned = min(2000, vocab_size - len(CHAT_TOKENS["llama3"]))
    if learned < 256:
        raise ValueError(f"vocab_size {vocab_size} is too small for the bench tokenizer (256 bytes + special tokens)")
    return build_tokenizer(texts, out_dir, chat_format="llama3", vocab_size=learned)


# ----------------------------------------------------------------------------- the run

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


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, of which this run: itself and its finished
    workers). Their difference over a run is what other jobs took from it (Linux; else zeros)."""
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    try:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    except (OSError, ValueError):
        return 0.0, 0.0
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own


class Bench:
    """The measurements of one run; a (figure, batch, seq, ckpt) point is measured once and may be
    quoted in both sections (a headline point that is also a grid point)."""

    def __init__(self, args, model_dir: Path, tokenizer):
        self.args, self.model_dir, self.tokenizer = args, model_dir, tokenizer
        self.device, self.dtype = args.device, DTYPES[args.dtype]
        self.ours = load("ours", model_dir, self.dtype, self.device).eval()
        self.hf = load("transformers", model_dir, self.dtype, self.device).eval()
        self.n_flop = flop_params(self.ours)
        self.figures, self.cache = [], {}

    def quote(self, section: str, key: tuple, measure):
        if key not in self.cache:
            self.cache[key] = measure()
        self.figures.extend({**f, "section": section} for f in self.cache[key])

    def prefill(self, section, B, T):
        def measure():
            ids = random_ids(B, T, self.ours.config.vocab_size, self.args.seed + 2).to(self.device)
            return [figure("prefill", "tokens/s", interleaved(prefill_fns(self.ours, self.hf, ids, self.device),
                                                              self.args), batch=B, seq=T)]
        self.quote(section, ("prefill", B, T), measure)

    def decode(self, section, B, T, compiled=False):
        """Decode figures; compiled: ours with generate.compiled_decoder (static cache, inductor;
        CUDA graphs on GPU; its first steps, timed in the warm-up, compile) beside transformers'
        default generate."""
        name = "decode_compiled" if compiled else "decode"

        def measure():
            ids = random_ids(B, T, self.ours.config.vocab_size, self.args.seed + 3).to(self.device)
            decoder = generate.compiled_decoder(self.device) if compiled else generate.Decoder()  # else eager
            fns = decode_fns(self.ours, self.hf, ids, self.args.new_tokens, self.device, decoder)
            if B == 1:
                fns["limit"] = weight_read_fn(self.ours, self.device)
            reps = interleaved(fns, self.args)
            found = [figure(name, "tokens/s", reps, batch=B, seq=T)]
            if B == 1:
                found[0]["limit"] = statistics.median(reps["limit"])
            if B == 1 and self.device.startswith("cuda"):
                share = 100 * self.n_flop * self.dtype.itemsize / self.args.peak_bandwidth
                found.append(scaled(found[0], name + "_bw", "% of bandwidth limit", share))
            return found
        self.quote(section, (name, B, T), measure)

    def stage2(self, section):
        def measure():
            fns, produced = stage2_fns(self.ours, self.hf, self.tokenizer, self.args)
            f = figure("stage2", "rows/s", interleaved(fns, self.args), batch=self.args.stage2_batch,
                       rows=self.args.stage2_rows, new_tokens=self.args.stage2_new_tokens)
            return [{**f, "tokens_produced": dict(produced)}]
        self.quote(section, ("stage2",), measure)

    def training(self, section, B, T, ckpt):
        def measure():
            a = self.args
            spec = {"model_dir": str(self.model_dir), "device": self.device, "dtype": a.dtype, "threads": a.threads,
                    "batch": B, "seq": T, "ckpt": ckpt, "target_frac": a.target_frac, "seed": a.seed + 4,
                    "compile": a.compile_train}
            warmup = max(1, a.train_warmup)
            res = train_both(spec, warmup + a.train_reps, interleave=not self.device.startswith("cuda"))
            where = dict(batch=B, seq=T, ckpt=ckpt)
            speed = figure("train", "tokens/s", {s: [B * T / r["seconds"] for r in res[s]["steps"][warmup:]]
                                                 for s in SIDES}, **where)
            speed["first_loss"] = {s: res[s]["steps"][0]["loss"] for s in SIDES}  # same weights, same batch
            found = [speed, figure("train_mem", "MiB", {s: [res[s]["peak_bytes"] / 2**20] for s in SIDES},
                                   better="lower", **where)]
            if self.device.startswith("cuda"):
                found.append(scaled(speed, "train_mfu", "% MFU", 100 * 6 * self.n_flop / a.peak_flops))
            return found
        self.quote(section, ("train", B, T, ckpt), measure)


def run(args) -> dict:
    import transformers
    torch.set_num_threads(args.threads)
    info, busy_at_start = machine(args), cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        model_dir, tokenizer = prepare(args, Path(tmp))
        b = Bench(args, model_dir, tokenizer)
        check = random_ids(2, 64, b.ours.config.vocab_size, args.seed + 1).to(args.device)
        with torch.inference_mode():
            logit_diff = (b.ours(check).float() - b.hf(check).logits.float()).abs().max().item()
        say(f"same weights: max |logit difference| {logit_diff:.1e}; {args.threads} torch threads; "
            f"transformers attention {b.hf.config._attn_implementation}")
        points = grid_points(args)

        say("headline: prefill, decode at batch 1 and 32, stage 2")  # in this process, with both models
        b.prefill("headline", args.batch, args.seq)
        b.decode("headline", 1, args.prompt_len)
        b.decode("headline", 32, args.prompt_len)
        b.decode("headline", 1, args.prompt_len, compiled=True)
        b.stage2("headline")
        for B, T in points:
            say(f"grid: prefill and decode at batch {B}, seq {T}")
            b.prefill("grid", B, T)
            b.decode("grid", B, T)
        meta = {"argv": sys.argv[1:], "machine": info, "transformers": transformers.__version__,
                "transformers_attention": b.hf.config._attn_implementation, "transformers_cache": "DynamicCache",
                "transformers_optimizer": "torch AdamW(fused=True)",
                "model": str(args.model or args.config or "DEFAULT_CONFIG (random weights)"),
                "config": checkpoint.config_to_hf(b.ours.config), "params": b.ours.num_params(), "flop_params": b.n_flop,
                "max_abs_logit_diff": logit_diff, "reps": args.reps, "warmup": args.warmup,
                "train_reps": args.train_reps, "train_warmup": args.train_warmup, "new_tokens": args.new_tokens,
                "target_frac": args.target_frac, "compile_train": args.compile_train}
        b.ours = b.hf = None  # training loads its own copies, in subprocesses
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()  # hand the GPU memory to them

        for ckpt in (False, True):
            say(f"headline: training at batch {args.batch}, seq {args.seq}, checkpointing {'on' if ckpt else 'off'}")
            b.training("headline", args.batch, args.seq, ckpt)
        for B, T in points:
            for ckpt in ((False, True) if args.full else (False,)):
                say(f"grid: training at batch {B}, seq {T}" + (", checkpointing on" if ckpt else ""))
                b.training("grid", B, T, ckpt)
    meta["seconds"] = round(time.perf_counter() - START, 1)
    (busy0, own0), (busy1, own1) = busy_at_start, cpu_seconds()
    meta["machine"]["other_jobs_cores"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / meta["seconds"]
    order = ["train", "train_mem", "train_mfu", "prefill", "decode", "decode_bw", "decode_compiled",
             "decode_compiled_bw", "stage2"]
    figures = sorted(b.figures, key=lambda f: (f["section"] != "headline", order.index(f["figure"]),
                                               f["batch"], f.get("seq", 0), f.get("ckpt", False)))
    return {"meta": meta, "figures": figures}


def fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def table(result: dict) -> str:
    meta, m = result["meta"], result["meta"]["machine"]
    c = meta["config"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores{', ' + m['gpu'] if 'gpu' in m else ''}; torch {m['torch']}, "
        f"{m['threads']} threads; {m['device']}, {m['dtype']}; other jobs used {m['other_jobs_cores']:.2f} of the "
        f"{m['cores']} cores during the run",
        f"model: {meta['model']}: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, mlp "
        f"{c['intermediate_size']}, heads {c['num_attention_heads']}/{c['num_key_value_heads']} kv, head_dim "
        f"{c['head_dim']}, vocab {c['vocab_size']}, {meta['params'] / 1e6:.1f}M parameters; "
        f"max |logit difference| {meta['max_abs_logit_diff']:.1e}",
        f"against transformers {meta['transformers']} LlamaForCausalLM ({meta['transformers_attention']}, "
        f"{meta['transformers_cache']}, {meta['transformers_optimizer']}); median of {meta['reps']} after "
        f"{meta['warmup']} warm-up (training: {meta['train_reps']} steps after {meta['train_warmup']}, "
        f"{meta['target_frac']:.0%} of tokens with a loss{', ours compiled' if meta['compile_train'] else ''}); decode: "
        f"{meta['new_tokens']} new tokens after a prompt of seq tokens; "
        f"{meta['seconds']:.0f} s in all",
        "",
        f"{'section':<8} {'figure':<15} {'batch':>5} {'seq':>5} {'ckpt':>4} {'ours':>9} {'transformers':>12} "
        f"{'ours/tf':>7} {'noise':>5}  unit",
    ]
    for f in result["figures"]:
        ckpt = {True: "on", False: "off"}.get(f.get("ckpt"), "")
        unit = f["unit"] + (f" ({f['rows']} rows, {f['new_tokens']} new tokens)" if f["figure"] == "stage2" else "")
        lines.append(f"{f['section']:<8} {f['figure']:<15} {f['batch']:>5} {f.get('seq', '-'):>5} {ckpt:>4} "
                     f"{fmt(f['ours']):>9} {fmt(f['transformers']):>12} {f['ratio']:>6.2f}x "
                     f"{'' if len(f['reps']['ours']) < 2 else format(f['noise'], '.0%'):>5}  {unit}"
                     + ("" if f["better"] == "higher" else ", lower is better"))
    b1, c1 = (next(f for f in result["figures"] if f["figure"] == name and f["batch"] == 1)
              for name in ("decode", "decode_compiled"))
    lines += ["", f"batch-1 decode limit here, measured in turn with it (one vector times every weight a step "
                  f"reads): {fmt(b1['limit'])} tokens/s; ours at {b1['ours'] / b1['limit']:.0%} of it "
                  f"(compiled: {c1['ours'] / c1['limit']:.0%}), transformers at {b1['transformers'] / b1['limit']:.0%}"]
    return "\n".join(lines)


def main(argv=None):
    global START
    START = time.perf_counter()
    args = parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))
    result = run(args)
    write_json(args.out, result)
    print(table(result))
    say(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
