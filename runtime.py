"""Processes and devices, below every stage: torchrun's process group, rank and world, the
all-reduce helpers and the barrier that training, stage 2 and evaluation share, the default
device and dtype, and command lines generated from a config dataclass.

Without torchrun there is one process, and every helper here does what one process needs:
all_sum returns its values, barrier returns at once, sum_gradients does nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from dataclasses import MISSING, field, fields
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm import tqdm

# ----------------------------------------------------------------------------- processes
# Under torchrun every rank runs the whole stage on its own device, with a whole copy of the
# model; the stage deals out its work (train.py: each step's micro-batches; stage 2: the rows)
# and meets the other ranks only in these collectives.

@contextmanager
def distributed(device: str = ""):
    """Under torchrun (RANK is set), join its process group for the duration: NCCL on CUDA, where
    LOCAL_RANK picks the GPU, gloo on CPU. Otherwise there is one process and nothing to join.
    Yields the device this process uses."""
    device = default_device(device)
    if "RANK" not in os.environ:
        yield device
        return
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    # A long timeout: the other ranks wait in a collective while rank 0 writes a checkpoint
    # (or, in augment.py, until the slowest rank has finished its rows).
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=1),
                            device_id=torch.device(device) if cuda else None)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of ranks): (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    return rank_and_world()[0] == 0


def all_sum(values: list, device) -> list:
    """values summed over the ranks (in float64: exact for counts); as they are without a process group."""
    if not dist.is_initialized():
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def sum_gradients(model: torch.nn.Module):
    """Sum every gradient over the ranks; a rank without a micro-batch in this step adds zeros.

    By hand, once per optimizer step, rather than by a DistributedDataParallel wrapper: DDP
    synchronises only through its wrapper's forward, which train.py bypasses (it calls
    model.hidden_states and model.lm_head itself), and a rank without a micro-batch (an epoch's
    last step may be short) would run no backward pass for DDP's hooks. What this gives up is
    DDP's overlap of the communication with the last backward pass: little beside the
    grad_accum / N micro-batches of compute of a step."""
    if not dist.is_initialized():
        return
    for p in model.parameters():
        if not p.requires_grad:  # frozen (LoRA's base): no gradient to share
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def say(who: str, msg: str):
    """One line to stderr from rank 0 only, above any progress bar: "who: msg"."""
    if is_main():
        tqdm.write(f"{who}: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------- devices

def default_device(device=None) -> str:
    """The device asked for, else cuda when there is one, else cpu."""
    return str(device) if device else ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device_dtype(device=None, dtype=None) -> tuple[str, torch.dtype]:
    """Defaults: cuda if available, else cpu; bf16 on cuda, fp32 on cpu."""
    device = default_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    return str(device), dtype


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


# ----------------------------------------------------------------------------- command lines

def option(default, help: str, **kw):
    """A config field with its --help text (and choices=..., checked by the config itself)."""
    return field(default=default, metadata={"help": help, **kw})


def parse_config(cls, argv=None, description: str = "", defaults: dict | None = None):
    """cls(**flags): argparse flags generated from a config dataclass's fields, so that names,
    defaults and help have one source of truth. A bool field is a switch; a field without a
    default is a required flag. `defaults` replaces some fields' defaults (e.g. a preset).
    Keyword-only fields (those a config inherits, such as labelset.LabelFlags) come last in --help."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in sorted(fields(cls), key=lambda f: f.kw_only):  # stable: each group keeps its order
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        default = (defaults or {}).get(f.name, f.default)
        shape = {k: f.metadata[k] for k in ("choices", "nargs", "metavar") if k in f.metadata}
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", default=default, help=help)
        elif default is MISSING:
            parser.add_argument(flag, required=True, help=help, **shape)
        else:
            parser.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), default=default,
                                help=f"{help} (default: {default!r})", **shape)
    return cls(**vars(parser.parse_args(argv)))


@contextmanager
def one_line_errors(program: str, on_interrupt: str = "interrupted"):
    """Bad input (ValueError, FileNotFoundError, RuntimeError: the errors our code raises with a
    message naming the file, row or tensor) ends the program with that one line and no
    traceback; Ctrl-C ends it with `on_interrupt`."""
    try:
        yield
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"{program}: {e}")
    except KeyboardInterrupt:
        sys.exit(f"{program}: {on_interrupt}")
