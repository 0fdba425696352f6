"""Memory of a training step: memory.py's estimates for the Llama models people fine-tune, and a
measurement of the real Llama-3.2-1B shapes on this machine beside its estimate.

    python bench/memory_table.py              # the README's table: estimates for 1B, 3B and 8B at batch 8 x 512
    python bench/memory_table.py --trace      # each beside the peak of a real step traced on fake tensors
    python bench/memory_table.py --trace --grad-accum 2   # steps that sum two micro-batches' gradients
    python bench/memory_table.py --measure    # + peak RSS beside the estimate on this CPU (random weights,
                                        #   two steps): the 1B shapes in bf16-pure at batch 1 x 128, and
                                        #   two 1B-wide blocks at 1 x 1,024 in fp32, bf16 and bf16-pure
    python bench/memory_table.py --small      # + train.py itself on a small model (SmolLM2-135M's shapes,
                                        #   random weights, the demo's data): q2a at batch 8 for 15 steps in
                                        #   fp32, bf16-pure and LoRA, each run's peak RSS and losses

The table's micro-batch: 8 examples of 512 tokens whose second halves are replies (2,048
positions with a loss, as a q2ra example's reasoning and label), one per optimizer step unless
--grad-accum says otherwise (the optimizer in the backward pass cannot accumulate). LoRA: rank
16 on every linear layer of the blocks, the base frozen in bf16, autocast. The estimates are
memory.py's arithmetic; the traced peaks count the tensors a step of train.py's own code holds
(memory_trace.py). On a GPU the CUDA context and the allocator's slack come on top of both
(typically 0.5-1 GB).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules, one folder up from here

import checkpoint  # noqa: E402
import demo  # noqa: E402
import loss  # noqa: E402
import memory  # noqa: E402
import memory_trace  # noqa: E402
from model import Llama, LlamaConfig  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

# The shapes of the public config.json files (rope scaling left out: it costs no memory).
MODELS = {
    "Llama-3.2-1B": LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "Llama-3.2-3B": LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Llama-3.1-8B": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=128),
}
MODES = {  # name -> memory.estimate's settings
    "bf16, fp32 master": dict(dtype="bf16"),
    "bf16-pure": dict(dtype="bf16-pure"),
    "bf16-pure + optimizer in backward": dict(dtype="bf16-pure", optimizer_in_backward=True),
    "LoRA r16, bf16 base": dict(dtype="bf16", lora_rank=16),
}


def estimates(batch=8, seq=512, targets=2048, accumulate=1) -> dict[tuple[str, str], list[int]]:
    """(model, mode) -> the estimated bytes with checkpointing off and on, for steps of `accumulate`
    micro-batches (the modes that can accumulate)."""
    return {(name, mode): [memory.estimate(config, batch, seq, targets, grad_checkpointing=ckpt, loss_chunk=loss.LOSS_CHUNK,
                                           accumulating=accumulate > 1, **settings)["total"] for ckpt in (False, True)]
            for name, config in MODELS.items() for mode, settings in MODES.items()
            if accumulate == 1 or not settings.get("optimizer_in_backward")}


def table(traced=False, batch=8, seq=512, targets=2048, accumulate=1) -> str:
    """Markdown: one row per model and mode, the estimate in GB with checkpointing off and on; with
    traced, each beside the peak traced on fake tensors (memory_trace.py; seconds per cell)."""
    columns = ["estimate", "traced"] if traced else ["estimate"]
    lines = ["| model | training | " + " | ".join(f"{c}, checkpointing {on}" for on in ("off", "on") for c in columns)
             + " |", "|---|---|" + "---:|" * 2 * len(columns)]
    for (name, mode), cells in estimates(batch, seq, targets, accumulate).items():
        row = []
        for ckpt, estimate in zip((False, True), cells):
            row.append(estimate)
            if traced:
                row.append(memory_trace.traced_peak(MODELS[name], batch, seq, grad_checkpointing=ckpt,
                                                    accumulate=accumulate, **MODES[mode]))
        lines.append(f"| {name} | {mode} | " + " | ".join(f"{n / 1e9:.2f} GB" for n in row) + " |")
    return "\n".join(lines)


# The 1B model's blocks, two of them, and a small vocabulary: a step whose activations dominate.
WIDE = LlamaConfig(vocab_size=1000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)


def measure(config: LlamaConfig, dtype: str, batch: int, seq: int) -> dict:
    """Two optimizer steps of a random model on the CPU (memory_trace.measured_peak: our loss and
    AdamW, no tracer); the peak resident memory from before the model is built, beside the estimate."""
    start = time.perf_counter()
    measured = memory_trace.measured_peak(config, batch, seq, torch.device("cpu"), dtype=dtype)
    estimate = memory.estimate(config, batch, seq, batch * (seq - seq // 2), dtype, device="cpu")["total"]
    return {"measured_bytes": measured, "estimate_bytes": estimate, "seconds": time.perf_counter() - start}


def measure_apart(*args) -> dict:
    """measure() in a process of its own: freed memory stays in a process's allocator, so a second
    measurement in the same process would see too little."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, args)


# SmolLM2-135M's shapes (its config.json), for train.py's own runs on a small model.
SMALL = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
SMALL_RUNS = {"fp32": ["--dtype", "fp32"], "bf16-pure": ["--dtype", "bf16-pure"],
              "LoRA r16, bf16 base": ["--dtype", "bf16", "--lora-rank", "16"]}


def small_runs(steps: int = 15) -> dict[str, dict]:
    """train.py, each run in a process of its own, on a random model in SMALL's shapes with the demo's
    tokenizer and emotion data: q2a at batch 8 (no accumulation) for `steps` steps. Per run: the
    peak (process RSS since setup began) and the first and last losses, from its metrics.jsonl."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        demo.prepare(tmp, rows=600, seed=0)
        paths = demo.settings(tmp, rows=600, seed=0)
        tokenizer = Tokenizer(paths["base_model"])
        config = replace(SMALL, bos_token_id=tokenizer.bos_id, eos_token_id=sorted(tokenizer.stop_ids))
        torch.manual_seed(0)
        model_dir = checkpoint.save_model(Llama(config), Path(tmp) / "small", tokenizer.serving_files())
        for name, flags in SMALL_RUNS.items():
            out = Path(tmp) / name.split()[0]
            run = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"), "--task",
                                  "q2a", "--model", str(model_dir), "--data", paths["data"], "--out", str(out),
                                  "--device", "cpu", "--batch-size", "8", "--grad-accum", "1", "--lr", "5e-4",
                                  "--max-steps", str(steps), "--eval-every", str(steps), *flags],
                                 capture_output=True, text=True)
            if run.returncode:
                raise RuntimeError(f"train.py in mode {name} failed:\n{run.stderr[-3000:]}")
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            results[name] = {"peak_bytes": max(r["peak_memory_bytes"] for r in rows),
                             "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"]}
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", action="store_true", help="beside each estimate, the peak of a training step "
                   "traced tensor by tensor on fake tensors (memory_trace.py; a few minutes)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step: above 1 the "
                   "gradients live through each forward pass (the optimizer in the backward pass is left out)")
    p.add_argument("--measure", action="store_true", help="also measure on this CPU: the 1B shapes (about 12 GB "
                   "RAM) and a two-block model at the 1B width in each dtype")
    p.add_argument("--small", action="store_true", help="also run train.py on a small model (SmolLM2-135M's "
                   "shapes) in fp32, bf16-pure and LoRA, and print each run's peak and losses")
    args = p.parse_args(argv)
    print(table(traced=args.trace, accumulate=args.grad_accum))
    if args.small:
        print_small_runs()
    if not args.measure:
        return
    runs = [("Llama-3.2-1B shapes", MODELS["Llama-3.2-1B"], "bf16-pure", 1, 128)] + \
        [("two 1B blocks, vocabulary 1,000", WIDE, dtype, 1, 1024) for dtype in ("fp32", "bf16", "bf16-pure")]
    print()
    for name, config, dtype, batch, seq in runs:
        result = measure_apart(config, dtype, batch, seq)
        ratio = result["measured_bytes"] / result["estimate_bytes"]
        print(f"{name}, {dtype}, batch {batch} x {seq}, two steps on this CPU: peak RSS "
              f"{memory.readable(result['measured_bytes'])}, estimate {memory.readable(result['estimate_bytes'])} "
              f"(measured / estimate = {ratio:.2f}), {result['seconds']:.0f} s", flush=True)



def print_small_runs():
    results = small_runs()
    fp32 = results["fp32"]["peak_bytes"]
    print()
    for name, r in results.items():
        print(f"{name}: q2a, batch 8, 15 steps on this CPU: peak RSS {memory.readable(r['peak_bytes'])} "
              f"({r['peak_bytes'] / fp32:.2f}x fp32's), loss {r['first_loss']:.2f} -> {r['last_loss']:.2f}", flush=True)


if __name__ == "__main__":
    main()
