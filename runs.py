"""A training run's folder, OUT: its checkpoints saved so that a crash never leaves a torn one,
what --resume needs to continue exactly where a run stopped, and what the run leaves to read.

    OUT/last/            the model (Hugging Face layout) + train_state.pt (optimizer, step, data
                         position, RNG, best validation loss), replaced in one rename
    OUT/metrics.jsonl    one line per optimizer step, cut back to the restart point on --resume
    OUT/loss.png         the loss curves, when matplotlib is installed

Ctrl-C (or SIGTERM) inside stop_requests() only asks the loop to stop after its step.
"""
from __future__ import annotations

import json
import os
import random
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

import checkpoint
import lora
from checkpoint import replace_dir
from files import write_atomic
from model import Llama
from runtime import barrier, is_main, say


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_best(out: Path, model: Llama, files: dict, base_model: str):
    """OUT/best: the model as a Hugging Face folder (LoRA adapters merged into it), and with LoRA
    OUT/best-adapter: the adapter alone, in PEFT's layout."""
    checkpoint.save_model(model, out / "best", files, state=lora.merged_state(model))
    lora.save_peft(model, out / "best-adapter", base_model)


def save_last(out: Path, model: Llama, optimizer, progress: dict, files: dict, base_model: str):
    """OUT/last = the model (Hugging Face layout, LoRA adapters merged) + train_state.pt (optimizer,
    step, data position, RNG, best validation loss, the adapters alone). Both are written into a
    staging folder that then replaces OUT/last in one rename, so a crash mid-save leaves the
    previous OUT/last whole and consistent. With LoRA, OUT/last-adapter follows it."""
    staging = out / ".last.staging"
    checkpoint.save_model(model, staging, files, state=lora.merged_state(model))
    torch.save({**progress, "optimizer": optimizer.state_dict(), "rng": rng_state(),
                "adapters": lora.adapter_state(model)}, staging / "train_state.pt")
    replace_dir(staging, out / "last")
    lora.save_peft(model, out / "last-adapter", base_model)


def restore(out: Path, model: Llama, optimizer, device) -> dict:
    """Put the model's adapters, the optimizer and the RNGs back as OUT/last saved them; returns
    where the run stood (step, epoch, index, best_val_loss, elapsed_s)."""
    state = torch.load(out / "last" / "train_state.pt", map_location=device,
                       weights_only=True)  # tensors and plain containers only: no code runs on load
    optimizer.load_state_dict(state.pop("optimizer"))
    set_rng_state(state.pop("rng"))
    lora.load_adapter_state(model, state.pop("adapters"))
    return state


def recover_last(out: Path):
    """A crash between replace_dir's two renames leaves no OUT/last, and the previous checkpoint,
    whole, in OUT/.last.old-PID: put it back (the newest, if there are several). Not .last.staging,
    which may be torn. Rank 0 renames; the other ranks wait for it."""
    if is_main() and not (out / "last").exists():
        old = [p for p in out.glob(".last.old-*") if (p / "train_state.pt").is_file()]
        if old:
            newest = max(old, key=lambda p: (p / "train_state.pt").stat().st_mtime)
            os.replace(newest, out / "last")
            say("train", f"{out / 'last'} was missing (a crash while it was being replaced): restored it from {newest.name}")
    barrier()


def open_folder(out: Path, config: dict, resume: bool, may_change: set, facts: dict | None = None):
    """A new run starts in a folder without one; --resume needs one that trains the same way
    (check_resumable)."""
    if resume:
        check_resumable(out, config, may_change, facts)
    elif (out / "last" / "train_state.pt").exists():
        raise FileExistsError(f"{out / 'last'}: a run is already there; pass --resume or choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def check_resumable(out: Path, config: dict, may_change: set, facts: dict | None = None):
    """There is a run to resume, and the resumed run trains the same way as the one it continues:
    every setting of `config` but those in may_change is the one train_config.json recorded, and
    so is each of `facts` (what the settings resolved to, such as the label set of the data)."""
    recover_last(out)
    if not (out / "last" / "train_state.pt").is_file():
        raise FileNotFoundError(f"{out / 'last' / 'train_state.pt'}: no saved run to --resume")
    recorded = json.loads((out / "train_config.json").read_text())
    saved = {**recorded["config"], **{name: recorded.get(name) for name in facts or {}}}
    for name, value in {**config, **(facts or {})}.items():
        if name not in may_change and saved.get(name) != value:
            raise ValueError(f"{out / 'train_config.json'}: the run was started with {name}={saved.get(name)!r}, "
                             f"cannot --resume it with {name}={value!r}")


def truncate_metrics(path: Path, step: int):
    """Keep only the metrics of steps up to `step`, where the run restarts: a crash may have
    logged steps after its last save, or torn the last line; a fresh run starts an empty file."""
    kept = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except json.JSONDecodeError:  # the line a kill cut short
            pass
    write_atomic(path, "".join(kept))


def plot_losses(out: Path):
    """OUT/loss.png: training and validation loss per step (matplotlib is optional)."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state
    except ImportError:
        say("train", "matplotlib is not installed: no loss.png (pip install matplotlib)")
        return
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    fig = Figure(figsize=(7, 4), layout="tight")
    ax = fig.subplots()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label="train")
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="optimizer step", ylabel="loss per target token", title=out.name)
    ax.legend()
    write_atomic(out / "loss.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))


@contextmanager
def stop_requests():
    """Ctrl-C (or SIGTERM) sets a flag: the loop finishes its optimizer step, saves OUT/last and
    stops, so no half-applied update is ever saved. A second Ctrl-C stops at once, but not under
    torchrun: there a terminal's Ctrl-C reaches every rank twice (directly, and passed on by
    torchrun, which kills the ranks that have not exited 30 s later)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield stop
        return

    def request(signum, frame):
        if not stop.is_set():
            say("train", "stopping after this step to save OUT/last"
                + ("" if dist.is_initialized() else " (Ctrl-C again to quit without saving)"))
        stop.set()
        if not dist.is_initialized():
            signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
