"""The measurements behind bench.py's figures: inputs both sides share, the timing, and each
figure's two sides (ours and transformers'), run in turn; training in a subprocess per side.
bench.py says what each figure is; here is how it is taken."""
from __future__ import annotations

import collections
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import augment
import checkpoint
import data
import generate
import memory
import optim
import train
from model import Llama

SIDES = ("ours", "transformers")

# ----------------------------------------------------------------------------- inputs and weights

WORDS = ("i feel so happy today because my friend came home again after the long rain and we "
         "laughed but then the news made me sad angry and a little afraid of what work will bring").split()


def emotion_texts(n: int) -> list[str]:
    """n fixed sentences of 6 to 35 words: stage-2 inputs of varied length."""
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(6 + (i * 11) % 30)) for i in range(n)]


def load(side: str, model_dir: Path, dtype: torch.dtype, device: str):
    if side == "ours":
        return checkpoint.load_model(model_dir, dtype, device)
    import transformers
    transformers.logging.set_verbosity_error()      # no generation-flag warnings
    transformers.logging.disable_progress_bar()     # no "Loading weights" bar
    return transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)  # attention: sdpa


def random_ids(batch: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def decode_weights(model: Llama) -> list[torch.Tensor]:
    """The matrices one decode step reads whole: all but the embedding, and the head even when tied."""
    weights = [p for name, p in model.named_parameters() if p.dim() == 2 and not name.startswith("embed_tokens")]
    return weights + ([model.lm_head.weight] if model.config.tie_word_embeddings else [])


def flop_params(model: Llama) -> int:
    """N of 6N (training) and of the bytes a batch-1 decode step reads: the decode weights + the norms."""
    return sum(w.numel() for w in decode_weights(model)) + sum(
        p.numel() for p in model.parameters() if p.dim() == 1)


# ----------------------------------------------------------------------------- figures

def figure(name, unit, reps: dict, better="higher", **where) -> dict:
    """One row of the table: each side's median and spread over its repetitions, and the median of
    the per-repetition ratios (the two sides' i-th repetitions ran back to back, so a disturbance
    that slows both cancels out of their ratio)."""
    med = {side: statistics.median(reps[side]) for side in SIDES}
    noise = max((max(reps[s]) - min(reps[s])) / med[s] if med[s] else 0.0 for s in SIDES)
    ratio = statistics.median(o / t for o, t in zip(reps["ours"], reps["transformers"]))
    return {"figure": name, **where, "unit": unit, "better": better, "ours": med["ours"],
            "transformers": med["transformers"], "ratio": ratio, "noise": noise,
            "reps": {side: list(reps[side]) for side in SIDES}}


def scaled(fig: dict, name: str, unit: str, factor: float) -> dict:
    """A figure derived from another by a constant factor (MFU, bandwidth share)."""
    return figure(name, unit, {s: [factor * x for x in fig["reps"][s]] for s in SIDES},
                  **{k: fig[k] for k in ("batch", "seq", "ckpt") if k in fig})


# ----------------------------------------------------------------------------- timing

def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clock(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def rate(work: float, fn, device: str):
    return lambda: work / clock(fn, device)


def interleaved(fns: dict, args) -> dict[str, list[float]]:
    """Each side's fn returns one measurement. After the warm-up rounds the sides alternate, the
    first swapping every round, so that another job landing mid-run slows both alike."""
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    out = {side: [] for side in fns}
    for rep in range(args.reps):
        for side in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
            out[side].append(fns[side]())
    return out


# ----------------------------------------------------------------------------- inference

def prefill_fns(ours, hf, ids, device) -> dict:
    B, T = ids.shape
    mask, prompts = torch.ones_like(ids), ids.tolist()

    @torch.inference_mode()
    def run_ours():
        generate.prefill(ours, prompts)

    @torch.inference_mode()
    def run_hf():
        hf(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)

    return {"ours": rate(B * T, run_ours, device), "transformers": rate(B * T, run_hf, device)}


def decode_fns(ours, hf, ids, n_new: int, device, decoder: generate.Decoder) -> dict:
    """New tokens/s: B * (n_new - 1) / (t(n_new) - t(1)), exactly n_new greedy tokens per row on
    both sides (no stop ids for ours, min_new_tokens for transformers). decoder: ours's decode step."""
    prompts, mask = ids.tolist(), torch.ones_like(ids)

    def run_ours(n):
        generate.generate_ids(ours, prompts, set(), generate.SamplingConfig(max_new_tokens=n), batch_size=len(ids),
                              decoder=decoder)

    @torch.inference_mode()
    def run_hf(n):
        hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    def decode_rate(run):
        return lambda: len(ids) * (n_new - 1) / max(clock(lambda: run(n_new), device) - clock(lambda: run(1), device),
                                                    1e-9)

    return {"ours": decode_rate(run_ours), "transformers": decode_rate(run_hf)}


def varied_stops(model, prompts, stop_ids, cfg) -> set[int]:
    """Stop ids that end replies at varied lengths, as real reasoning does: random weights never
    emit a stop id, so every reply would run to max_new_tokens and batching strategies could not
    differ. The tokens a free greedy run emits most often are added to stop_ids, skipping any
    that would end most replies within a quarter of max_new_tokens (a first token that every
    prompt shares, say), until the median reply ends before half of max_new_tokens."""
    free = [r["ids"] for r in generate.generate_ids(model, prompts, set(), cfg, batch_size=len(prompts))]

    def median_length(stops):
        return statistics.median(next((k for k, t in enumerate(ids) if t in stops), len(ids)) for ids in free)

    stops, n = set(stop_ids), cfg.max_new_tokens
    for token, _ in collections.Counter(t for ids in free for t in ids).most_common():
        if median_length(stops) < n / 2:
            break
        if median_length(stops | {token}) >= n / 4:
            stops.add(token)
    return stops


def stage2_fns(ours, hf, tokenizer, args) -> tuple[dict, dict]:
    """Rows as augment() meets them (sorted by text length): ours in one continuous batch of
    --stage2-batch rows (augment.augment_rows), transformers' generate cut into batches."""
    rows = [{"id": i, "text": t, "label": data.LABELS[i % 6]} for i, t in enumerate(emotion_texts(args.stage2_rows))]
    rows.sort(key=lambda row: len(row["text"]))
    batches = [rows[i:i + args.stage2_batch] for i in range(0, len(rows), args.stage2_batch)]
    cfg = generate.SamplingConfig(max_new_tokens=args.stage2_new_tokens)
    if not args.model:  # random weights: a real checkpoint ends its replies by itself
        tokenizer = copy.copy(tokenizer)
        prompts = [augment.rgen_prompt(tokenizer, row) for row in rows]
        tokenizer.stop_ids = varied_stops(ours, prompts, tokenizer.stop_ids, cfg)
    stop = sorted(tokenizer.stop_ids)
    produced = {}

    def run_ours():
        out = list(augment.augment_rows(ours, tokenizer, rows, cfg, args.stage2_batch))
        produced["ours"] = sum(r["n_tokens"] for r in out)

    @torch.inference_mode()
    def run_hf():
        n_tokens = 0
        for batch in batches:
            prompts = [augment.rgen_prompt(tokenizer, row) for row in batch]
            T = max(map(len, prompts))
            ids = torch.tensor([[tokenizer.pad_id] * (T - len(p)) + p for p in prompts], device=args.device)
            mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=args.device)
            out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=args.stage2_new_tokens,
                              eos_token_id=stop, pad_token_id=tokenizer.pad_id)
            for reply in out[:, T:].tolist():
                reply = reply[:next((i for i, t in enumerate(reply) if t in stop), len(reply))]
                tokenizer.decode(reply).strip()
                n_tokens += len(reply)
        produced["transformers"] = n_tokens

    n = len(rows)
    return {"ours": rate(n, run_ours, args.device), "transformers": rate(n, run_hf, args.device)}, produced


def weight_read_fn(model: Llama, device: str):
    """Rate of the cheapest batch-1 decode step possible: a vector times each decode weight, no more.
    Measured in turn with the two decode runs, in the same state of the caches and the machine."""
    weights = decode_weights(model)
    x = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}

    @torch.inference_mode()
    def read_all():
        for w in weights:
            F.linear(x[w.shape[1]], w)

    return rate(1, read_all, device)


# ----------------------------------------------------------------------------- training

def worker_main(spec: dict):
    """One side's training in this fresh process: load, then one optimizer step per "step" line on
    stdin, answering {"seconds", "loss"}; on "done", the peak memory above the loaded weights."""
    reply, sys.stdout = sys.stdout, sys.stderr  # the protocol owns stdout; stray prints go to stderr
    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    cfg = train.TrainConfig(task="q2a", data="-", out="-", dtype=spec["dtype"], grad_checkpointing=spec["ckpt"],
                            compile=spec["compile"])
    if spec["side"] == "ours":  # as train.py loads it: fp32 masters, checkpointing, --compile's blocks
        model = train.training_model(Path(spec["model_dir"]), cfg, torch.device(device), cfg.compile)
    else:
        model = load("transformers", Path(spec["model_dir"]), torch.float32, device).train()  # fp32 masters
    peak = memory.memory_probe(torch.device(device))
    step = train_step_fn(model, spec, cfg)
    print(json.dumps({"ready": True}), file=reply, flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        sync(device)
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        print(json.dumps({"seconds": time.perf_counter() - t0, "loss": loss}), file=reply, flush=True)
    print(json.dumps({"peak_bytes": peak()}), file=reply, flush=True)


def train_step_fn(model, spec: dict, cfg: train.TrainConfig):
    """A function running one optimizer step of this side on a fixed batch; returns the loss."""
    device, B, T = spec["device"], spec["batch"], spec["seq"]
    ids = random_ids(B, T, model.config.vocab_size, spec["seed"])
    is_target = torch.zeros(B, T, dtype=torch.bool)
    is_target[:, T - max(1, round(spec["target_frac"] * T)):] = True
    # Both sides: optim.py's AdamW, fused (also the Trainer's default, adamw_torch_fused), decay on matrices only.
    optimizer = optim.build_optimizer(model, cfg.lr, cfg.weight_decay, False, torch.device(device))
    if spec["side"] == "ours":
        batch = data.collate([data.Example(row, mask) for row, mask in zip(ids, is_target)], pad_id=0).to(device)
        return lambda: train.train_step(model, optimizer, [batch], cfg.lr, cfg.dtype == "bf16", cfg.grad_clip)[0]

    if spec["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    input_ids, labels = ids.to(device), ids.masked_fill(~is_target, -100).to(device)

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


class TrainWorker:
    """Parent's end of a worker_main subprocess (bench.py --worker SPEC runs worker_main)."""

    def __init__(self, spec: dict):
        self.spec, self.log = spec, tempfile.TemporaryFile("w+")
        script = Path(__file__).resolve().with_name("bench.py")
        self.proc = subprocess.Popen([sys.executable, str(script), "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.reply()  # ready: loaded

    def reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            raise RuntimeError(f"bench worker ({self.spec['side']}, batch {self.spec['batch']}, seq "
                               f"{self.spec['seq']}) exited with {self.proc.returncode}:\n{self.log.read()}")
        return json.loads(line)

    def send(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def finish(self) -> int:
        peak = self.send("done")["peak_bytes"]
        self.proc.wait()
        return peak

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def train_both(spec: dict, n_steps: int, interleave: bool) -> dict:
    """Each side's step results and peak memory. interleave (CPU): both workers stay loaded and
    step in turn; otherwise (GPU, whose memory both would share) one after the other."""
    steps, peaks, workers = {side: [] for side in SIDES}, {}, {}
    try:
        for group in ([SIDES] if interleave else [[side] for side in SIDES]):
            for side in group:
                workers[side] = TrainWorker({**spec, "side": side})
            for i in range(n_steps):
                for side in (group if i % 2 == 0 else group[::-1]):
                    steps[side].append(workers[side].send("step"))
            for side in group:
                peaks[side] = workers[side].finish()
    finally:
        for w in workers.values():
            w.close()
    return {side: {"steps": steps[side], "peak_bytes": peaks[side]} for side in SIDES}


