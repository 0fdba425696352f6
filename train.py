"""Stages 1 and 3: supervised fine-tuning of a Llama checkpoint, with the loss on the reply only.

    python train.py --task q2a --data dair-ai/emotion --out runs/q2a
    python train.py --task rgen --data syvai/reasoning-gen --max-examples 20000 --epochs 1 --out runs/rgen

Read top to bottom, as nanoGPT's train.py: config, seed and device, data (rows -> token ids
and target masks -> length-grouped batches), model, optimizer, schedule, and the loop with
validation and checkpoints; the loss it minimises, on the reply tokens only, is loss.py's.
A run writes to --out:

    train_config.json   the full config, what the data turned out to be, the memory estimate
    metrics.jsonl       one line per optimizer step: loss, lr, grad norm, val_loss when evaluated,
                        elapsed time, peak memory so far, and speed: tokens_per_s (all real tokens,
                        padding excluded) and target_tokens_per_s (the reply tokens with a loss)
    loss.png            the loss curves, when matplotlib is installed
    best/               the checkpoint with the lowest validation loss (Hugging Face layout)
    last/               the latest checkpoint, plus train_state.pt for --resume
    *-adapter/          with --lora-rank: best's and last's adapter alone, in PEFT's layout

Ctrl-C (or SIGTERM) finishes the current optimizer step, saves last/ and exits; a crash loses
the steps since the last --save-every. --resume continues from last/ exactly where the run
stopped: on CPU in fp32 its losses equal those of an uninterrupted run bit for bit.

Data parallel on N GPUs of one machine (the same flags; gloo on CPU, NCCL on CUDA):

    torchrun --nproc-per-node 4 train.py --task q2a --data dair-ai/emotion --out runs/q2a --grad-accum 4

An optimizer step is the same batch_size x grad_accum examples whatever N is: every rank runs
this whole file with all the data, and rank r runs the step's micro-batches r, r + N, ... (so
--grad-accum must be a multiple of N); each loss is divided by the target tokens of the whole
step, and the gradients are summed over the ranks, so clipping and the AdamW step run
identically on every rank and no parameters are ever exchanged. N ranks therefore train the
model one process would (up to the order of floating-point sums), the lr schedule and step
count do not change with N, and a run may be resumed on another number of ranks. Only rank 0
logs and writes files. Every rank holds the whole model and its AdamW state: sharding them
(FSDP2) is not implemented; bf16-pure or LoRA (below) make the 3B and 8B models fit one GPU
instead.

Precision: with --dtype bf16 the weights, gradients and AdamW state stay fp32 (the master
copy) and only the forward/backward matmuls run in bf16 under autocast. A bf16 weight cannot
take an update below ~1/256 of its size, so lr 1e-5 steps would mostly round away; fp32
masters keep them, at 4 + 4 + 8 bytes per parameter (~20 GB for Llama-3.2-1B before
activations). --dtype bf16-pure keeps everything in bf16 (8 bytes per parameter) and rounds
each update stochastically instead, so that small updates survive on average (optim.py);
--optimizer-in-backward then drops the gradients' 2 bytes too. --lora-rank trains small
adapters beside a frozen model instead (lora.py). The log states the run's memory estimate at
the start and the peak it measured at the end (memory.py).

References: Karpathy's nanoGPT (train.py); Chen et al. 2016 (gradient checkpointing);
Micikevicius et al. 2018 (mixed precision with fp32 master weights); Hu et al. 2021 (LoRA).
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import checkpoint
import data
import lora
import memory
import labelset
import loss
import runs
from checkpoint import resolve_checkpoint
from files import write_json
from model import Llama
from optim import build_optimizer, lr_at, optimizer_step
from tokenizer import Tokenizer
from runtime import (all_sum, barrier, default_device, distributed, is_main, option, parse_config,
                     rank_and_world, say)


# ----------------------------------------------------------------------------- config

@dataclass
class TrainConfig(labelset.LabelFlags, memory.MemoryFlags):  # the label set (q2a/q2ra); precision, LoRA
    task: str = field(metadata={"help": "rgen (stage 1: question + answer -> reasoning), q2a (text -> emotion) "
                                        "or q2ra (text -> reasoning + 'Emotion: <label>')",
                                "choices": tuple(data.TASKS)})
    data: str = field(metadata={"help": "rgen: reasoning-gen folder or hub id; q2a: emotion folder, file or hub "
                                        "id; q2ra: the stage-2 jsonl (text, label, reasoning)"})
    out: str = field(metadata={"help": "run folder: train_config.json, metrics.jsonl, loss.png, best/, last/"})
    model: str = option("meta-llama/Llama-3.2-1B-Instruct", "checkpoint folder or hub id to start from "
                    "(its tokenizer is used, and saved into every checkpoint with our chat template)")
    max_examples: int = option(0, "training examples used (0: all): q2a/q2ra the N lowest row ids, so both see the "
                              "same rows; rgen reads this many (plus --val-examples), spread evenly over the whole set")
    val_examples: int = option(500, "validation examples: the N lowest ids of the emotion 'validation' split when it "
                           "exists, else N held out from the training rows, at most a tenth of them (a seeded "
                           "random slice; rgen: every k-th of the rows read, which are --max-examples plus these). "
                           "0: no validation, best/ = the final model")
    val_data: str = option("", "q2a/q2ra: take the validation rows from here instead (an emotion source, or a "
                           "stage-2 jsonl for q2ra), so that every training row is trained on")
    rgen_columns: str = option("", "rgen: the columns of question, answer and reasoning, where their names are none "
                           "of the known aliases, as question=COL,answer=COL,reasoning=COL (any of the three)")
    max_seq_len: int = option(0, "token limit per example (0: 1024 for rgen, whose replies are long, 512 for "
                          "q2a/q2ra); longer ones are counted, and rgen's cut from the right, q2ra's shortened in "
                          "their reasoning, q2a's dropped: a classifier's label and end-of-turn token always stay")
    epochs: float = option(2.0, "passes over the training examples; the lr schedule spans them "
                       "(fractions allowed; 1-2 suit a full fine-tune, the pipeline uses 1 for rgen)")
    max_steps: int = option(0, "stop after this many optimizer steps (0: after --epochs). The lr schedule still "
                        "spans --epochs, so a run stopped here (which also evaluates there) and resumed "
                        "trains exactly as one uninterrupted run")
    batch_size: int = option(8, "examples per micro-batch (per forward/backward pass)")
    grad_accum: int = option(4, "micro-batches per optimizer step; with the default batch size 8 x 4 = 32 examples per step")
    lr: float = option(1e-5, "peak learning rate (1e-5..2e-5 suits a full fine-tune of a 1B model)")
    min_lr_ratio: float = option(0.1, "the cosine decay ends at lr * this")
    warmup_ratio: float = option(0.03, "linear warm-up over this fraction of the optimizer steps")
    weight_decay: float = option(0.01, "AdamW weight decay, on weight matrices only (never on norms)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    compile: bool = option(False, "torch.compile each decoder block (inductor): fused elementwise kernels, "
                       "for GPU speed; the first steps of each new sequence length compile")
    length_chunk: int = option(64, "length grouping: each epoch's shuffled examples are sorted by length within "
                           "chunks of this many micro-batches, so little compute goes to padding (1: off)")
    eval_every: int = option(100, "validation loss every N optimizer steps (and at the end)")
    save_every: int = option(200, "write OUT/last every N optimizer steps (and at the end, and on Ctrl-C)")
    resume: bool = option(False, "continue the run in --out from OUT/last exactly where it stopped")
    seed: int = option(0, "seed of the batch order, the held-out slice and the torch/python RNGs")
    device: str = option("", "cuda, cuda:N or cpu (default: cuda when available); under torchrun, "
                     "cuda and cuda:N mean the GPU LOCAL_RANK")
    skip_bad: bool = option(False, "skip (and count) bad data rows instead of stopping at the first one")

    def __post_init__(self):
        for f in fields(self):
            if "choices" in f.metadata and getattr(self, f.name) not in f.metadata["choices"]:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r} is not one of {', '.join(f.metadata['choices'])}")
        self.max_seq_len = self.max_seq_len or data.TASKS[self.task].max_seq_len
        if self.optimizer_in_backward and self.grad_accum != 1:
            raise ValueError(f"--optimizer-in-backward steps at every backward pass, so it cannot accumulate "
                             f"gradients over micro-batches: pass --grad-accum 1 (not {self.grad_accum})")
        if self.optimizer_in_backward and self.grad_clip:
            raise ValueError("--optimizer-in-backward updates each parameter before the other gradients exist, "
                             "so the global gradient norm cannot be clipped: pass --grad-clip 0")


# Fields that may change on --resume: they do not change the training trajectory.
RESUMABLE_CHANGES = {"resume", "max_steps", "eval_every", "save_every", "device", "compile", "grad_checkpointing"}


def parse_args(argv=None) -> TrainConfig:
    return parse_config(TrainConfig, argv, description=__doc__.split("\n\n")[0])


def log(msg: str):
    say("train", msg)


# ----------------------------------------------------------------------------- step

def train_step(model: Llama, optimizer, micro_batches: list[data.Batch], lr: float, autocast: bool,
               grad_clip: float) -> tuple[float, float]:
    """One optimizer step at learning rate lr; returns the loss per target token and the
    gradient norm before clipping to grad_clip (both floats: this waits for the GPU, once per
    step). With --optimizer-in-backward the parameters are updated during forward_backward."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_loss = loss.forward_backward(model, micro_batches, autocast)
    return step_loss, optimizer_step(optimizer, model.parameters(), grad_clip)


# ----------------------------------------------------------------------------- training

@dataclass
class Run:
    """What setup() prepares for the loop: the run's folder, data, model, optimizer and where it stands."""
    out: Path
    device: torch.device
    model: Llama
    optimizer: torch.optim.Optimizer
    train_set: list[data.Example]
    val_batches: list[data.Batch]       # this rank's share, already on the device
    pad_id: int
    validate: bool                      # there are validation examples (on some rank)
    files: dict                         # saved with every checkpoint (Tokenizer.serving_files)
    base_model: str                     # cfg.model, named in LoRA adapters' configs
    memory_estimate: int                # bytes, for the largest micro-batch (memory_plan)
    peak_memory: Callable[[], int]      # bytes held at most since setup() began (memory.memory_probe)
    total_steps: int                    # what the lr schedule spans
    stop_step: int
    progress: dict                      # step, epoch, index (step within the epoch), best_val_loss, elapsed_s


def setup(cfg: TrainConfig) -> Run:
    """Check the run folder, seed, read and tokenize the data, load the model, build the optimizer,
    and restore the run's state on --resume; write train_config.json."""
    out = Path(cfg.out)
    rank, world = rank_and_world()
    labels = open_run(cfg, out, world)

    # seed and device
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = torch.device(default_device(cfg.device))
    peak_memory = memory.memory_probe(device)  # what the run adds to the process, from here on

    # data
    base_dir = resolve_checkpoint(cfg.model)
    tokenizer = Tokenizer(base_dir)
    train_set, val_set, data_counts = data.load_examples(
        cfg.task, cfg.data, tokenizer, cfg.max_seq_len, cfg.max_examples, cfg.val_examples, cfg.val_data,
        cfg.seed, cfg.skip_bad, cfg.rgen_columns, labels or labelset.EMOTION)  # rgen has no labels
    if not train_set:
        raise ValueError(f"{cfg.data}: no training examples for task {cfg.task}")
    first_epoch = epoch_steps(cfg, train_set, epoch=0)
    steps_per_epoch = len(first_epoch)
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    stop_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    val_order = sorted(val_set, key=lambda ex: len(ex.ids))  # sorted: least padding
    val_batches = [data.collate(val_order[s:s + cfg.batch_size], tokenizer.pad_id).to(device)
                   for s in range(0, len(val_order), cfg.batch_size)][rank::world]  # this rank's share
    planned = memory_plan(cfg, base_dir, train_set, first_epoch, cfg.grad_accum > world, device)
    if rank == 0:
        write_json(out / "train_config.json", {
            "config": asdict(cfg), "prompt_version": data.PROMPT_VERSION, "train_examples": len(train_set),
            "val_examples": len(val_set), **data_counts, "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps, "examples_per_step": cfg.batch_size * cfg.grad_accum, "ranks": world,
            "device": str(device), "torch": torch.__version__, "memory_estimate": planned})
    log(f"{cfg.task}: {len(train_set)} training / {len(val_set)} validation examples, "
        f"{steps_per_epoch} optimizer steps per epoch, {total_steps} in the schedule, stopping at {stop_step}; "
        f"replies up to {data_counts['max_new_tokens']} tokens (the checkpoints' max_new_tokens)")
    summed = ", gradients summed over micro-batches" if planned["accumulating"] else ""
    log(f"memory estimate for the largest micro-batch ({planned['batch']} x {planned['seq']} tokens, "
        f"{planned['targets']} with a loss{summed}): "
        + ", ".join(f"{k} {memory.readable(v)}" for k, v in planned["bytes"].items()))

    # model (LoRA resumes from the base: last/ holds merged weights, train_state.pt the adapters)
    model = training_model(out / "last" if cfg.resume and not cfg.lora_rank else base_dir, cfg, device, cfg.compile)

    # optimizer, and where the run stands
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.optimizer_in_backward, device)
    progress = {"step": 0, "epoch": 0, "index": 0, "best_val_loss": math.inf, "elapsed_s": 0.0}
    if cfg.resume:
        progress = runs.restore(out, model, optimizer, device)
        log(f"resumed at step {progress['step']} (epoch {progress['epoch']}, step {progress['index']} of it)")
    if rank == 0:
        runs.truncate_metrics(out / "metrics.jsonl", progress["step"])
    # Saved with every checkpoint: the tokenizer, our chat template and the reply budget.
    files = tokenizer.serving_files(max_new_tokens=data_counts["max_new_tokens"])
    if labels:  # and the label set, which eval.py reads back
        files[labelset.LABEL_SET_FILE] = json.dumps(labels.settings(), indent=2, ensure_ascii=False) + "\n"
    return Run(out, device, model, optimizer, train_set, val_batches, tokenizer.pad_id, bool(val_set), files,
               cfg.model, planned["bytes"]["total"], peak_memory, total_steps, stop_step, progress)


def open_run(cfg: TrainConfig, out: Path, world: int) -> labelset.LabelSet | None:
    """Check that the ranks can share each step, resolve the label set (q2a/q2ra: from the data and
    the flags; rgen has none) and open the run folder: a new run in a folder without one, --resume
    in one that trains the same way, on the same label set."""
    if cfg.grad_accum % world:
        raise ValueError(f"--grad-accum {cfg.grad_accum} is not a multiple of the {world} ranks, "
                         f"which share each step's micro-batches")
    rgen = data.get_task(cfg.task).rows == "reasoning-gen"
    labels = None if rgen else labelset.from_flags(cfg.data, cfg, cfg.skip_bad)
    runs.open_folder(out, asdict(cfg), cfg.resume, RESUMABLE_CHANGES, {"label_set": labels and labels.settings()})
    return labels


def memory_plan(flags: memory.MemoryFlags, base_dir: Path, train_set: list[data.Example], first_epoch: list,
                accumulating: bool, device: torch.device) -> dict:
    """The memory estimate of the first epoch's largest micro-batch (every epoch holds the same
    examples, so the same largest one, give or take the grouping); accumulating: a rank runs
    several micro-batches per step, and so holds gradients through their forward passes."""
    return memory.plan(checkpoint.config_from_json(base_dir / "config.json"), [len(ex.ids) for ex in train_set],
                       [int(ex.is_target.sum()) for ex in train_set],
                       [micro for step in first_epoch for micro in step], flags, loss.LOSS_CHUNK, accumulating,
                       device.type)


def training_model(path: Path, flags: memory.MemoryFlags, device: torch.device, compile: bool = False) -> Llama:
    """The model to train, in memory.weights_dtype: with LoRA, fp32 adapters beside the frozen
    weights; gradient checkpointing as flagged; compile: each block through torch.compile."""
    dtype = memory.weights_dtype(flags.dtype, flags.lora_rank)
    model = checkpoint.load_model(path, dtype=dtype, device=device)
    if flags.lora_rank:
        adapted = lora.add_adapters(model, flags.lora_rank, flags.lora_alpha, flags.lora_targets.split(","))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"LoRA rank {flags.lora_rank} on {len(adapted)} layers: {trainable / 1e6:.2f}M trainable parameters")
    model.gradient_checkpointing = flags.grad_checkpointing
    model.train()
    if compile:
        for block in model.layers:  # in place: parameter names, and so checkpoints, stay as they are
            block.compile()
    log(f"{model.num_params() / 1e6:.1f}M parameters in {str(dtype).removeprefix('torch.')}"
        + (" (bf16 autocast for the matmuls)" if flags.dtype == "bf16" else "")
        + (", each updated in the backward pass" if flags.optimizer_in_backward else ""))
    return model


def epoch_steps(cfg: TrainConfig, train_set: list[data.Example], epoch: int) -> list[list[list[int]]]:
    """The epoch's optimizer steps, each a list of micro-batches of example indices."""
    return data.optimizer_steps([len(ex.ids) for ex in train_set], cfg.batch_size, cfg.grad_accum,
                                cfg.length_chunk, cfg.seed, epoch)


def evaluate_and_keep_best(run: Run, autocast: bool) -> dict:
    """The validation loss (the same on every rank); a new best is saved as OUT/best."""
    if not run.validate:
        return {}
    val_loss = loss.validation_loss(run.model, run.val_batches, autocast)
    if val_loss < run.progress["best_val_loss"]:
        run.progress["best_val_loss"] = val_loss
        if is_main():
            runs.save_best(run.out, run.model, run.files, run.base_model)
    return {"val_loss": val_loss}


def train(cfg: TrainConfig) -> Path:
    """Fine-tune cfg.model on cfg.task; returns the folder of the best checkpoint (OUT/best).
    Under torchrun (see runtime.distributed), each rank calls this with its own device."""
    run = setup(cfg)
    progress, (rank, world) = run.progress, rank_and_world()
    bar = tqdm(total=run.stop_step, initial=progress["step"], desc=f"train {cfg.task}", unit="step", disable=rank > 0)
    start_time = time.perf_counter() - progress["elapsed_s"]
    autocast = cfg.dtype == "bf16"  # bf16 matmuls over fp32 master weights
    steps = epoch_steps(cfg, run.train_set, progress["epoch"])
    # the loop: one optimizer step per iteration, from wherever the run stands to stop_step
    with runs.stop_requests() as stop, open(run.out / "metrics.jsonl" if rank == 0 else os.devnull, "a") as metrics:
        while progress["step"] < run.stop_step:
            if progress["index"] == len(steps):  # the epoch is done: the next one has its own batch order
                progress.update(epoch=progress["epoch"] + 1, index=0)
                steps = epoch_steps(cfg, run.train_set, progress["epoch"])
            t0 = time.perf_counter()
            lr = lr_at(progress["step"], run.total_steps, cfg.lr, cfg.warmup_ratio, cfg.min_lr_ratio)
            micro_batches = [data.collate([run.train_set[i] for i in ids], run.pad_id).to(run.device)
                             for ids in steps[progress["index"]][rank::world]]  # this rank's share of the step
            step_loss, grad_norm = train_step(run.model, run.optimizer, micro_batches, lr, autocast, cfg.grad_clip)
            dt = time.perf_counter() - t0
            progress.update(step=progress["step"] + 1, index=progress["index"] + 1,
                            elapsed_s=time.perf_counter() - start_time)
            step = progress["step"]
            # Summed over the ranks, with the stop requests: any rank's Ctrl-C stops them all at this step.
            tokens, targets, stopping = all_sum([sum(b.n_tokens for b in micro_batches),
                                                 loss.count_targets(micro_batches), stop.is_set()], run.device)
            row = {"step": step, "epoch": progress["epoch"], "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                   "peak_memory_bytes": run.peak_memory(),
                   "tokens_per_s": tokens / dt, "target_tokens_per_s": targets / dt}
            if step % cfg.eval_every == 0 or step == run.stop_step:
                row.update(evaluate_and_keep_best(run, autocast))
            metrics.write(json.dumps({**row, "elapsed_s": progress["elapsed_s"]}) + "\n")
            metrics.flush()
            # tok/s counts every real (non-padding) token; tgt/s only the reply tokens that carry the loss
            bar.update()
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}",
                            tgt_s=f"{targets / dt:.0f}", refresh=False)
            if step % cfg.save_every == 0 or step == run.stop_step or stopping:
                if rank == 0:
                    runs.save_last(run.out, run.model, run.optimizer, progress, run.files, run.base_model)
                barrier()  # no rank exits (which would make torchrun stop rank 0) before the save is whole
            if stopping:
                bar.close()
                log(f"stopped at step {step}; {run.out / 'last'} is saved: continue with --resume")
                raise KeyboardInterrupt
    bar.close()
    finish(run)
    return run.out / "best"


def finish(run: Run):
    """Without validation the final model is the best we know; the closing line and loss.png."""
    if is_main():
        if not run.validate:
            runs.save_best(run.out, run.model, run.files, run.base_model)
        log(f"peak memory {memory.readable(run.peak_memory())} "
            f"({'allocated on the GPU' if run.device.type == 'cuda' else 'resident'}, since setup began); "
            f"estimated {memory.readable(run.memory_estimate)} for the largest micro-batch")
        log(f"done at step {run.progress['step']}: best validation loss {run.progress['best_val_loss']:.4f}, "
            f"{run.progress['elapsed_s'] / 60:.1f} min in all; best checkpoint: {run.out / 'best'}")
        runs.plot_losses(run.out)
    barrier()


def main(argv=None):
    cfg = parse_args(argv)
    try:
        with distributed(cfg.device) as device:
            train(replace(cfg, device=device))
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # bad input: one line, no traceback
        sys.exit(f"train.py: {e}")


if __name__ == "__main__":
    main()
