"""The peak memory of a training step, traced tensor by tensor: memory.py's estimate checked at
shapes this machine cannot hold (Llama-3.1-8B) in seconds.

    traced_peak(config, batch, seq, dtype=..., optimizer_in_backward=..., lora_rank=...,
                grad_checkpointing=...)   -> the most bytes of tensors alive at once
    measured_peak(config, batch, seq, device, ...)  -> the same steps run for real: on a GPU, the
                                                        peak memory torch allocated

The step is our own (loss.loss_sum and its backward, optim.py's optimizer, LoRA from lora.py),
run twice (the second step is the steady state: the AdamW moments exist) on fake tensors: torch's
FakeTensorMode gives every tensor its shape, dtype and device but no data, so nothing is
allocated or computed. A dispatch mode sees each tensor every operation creates; a weakref on its
storage sees it freed. The peak is the largest sum of live storages: what
torch.cuda.max_memory_allocated would report for the same operations, less the allocator's
rounding (to 512 bytes) and the kernels' own workspaces. The operations are the CPU's (on a GPU,
attention's kernels save much the same tensors).

One correction: outside a tracer, the autograd engine adds two gradients of the same tensor (a
tied embedding's, from the head and from the lookup) in place into one it holds the only
reference to; under any Python dispatch mode it cannot tell, and adds them into a new tensor. An
engine add whose two inputs are both freed before the next operation is therefore counted as the
in-place add it would be.
"""
from __future__ import annotations

import contextlib
import sys
import weakref
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules, one folder up from here

import data  # noqa: E402
import lora  # noqa: E402
import loss  # noqa: E402
import memory  # noqa: E402
import optim  # noqa: E402
from model import Llama, LlamaConfig  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages created under it that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.seen = weakref.WeakSet()  # the storages counted (each once, however many views)
        self.now = self.peak = 0
        self.engine_add = None  # (live bytes before it, its two inputs' storages): settled at the next operation

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.settle()
        before = self.now
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t.untyped_storage())
        if func is torch.ops.aten.add.Tensor and all(isinstance(a, torch.Tensor) for a in args[:2]) \
                and torch._C._current_autograd_node() is not None:
            self.engine_add = (before, [weakref.ref(a.untyped_storage()) for a in args[:2]])
        else:
            self.peak = max(self.peak, self.now)
        return out

    def track(self, storage):
        if storage not in self.seen:
            self.seen.add(storage)
            self.now += storage.nbytes()
            weakref.finalize(storage, self.free, storage.nbytes())

    def free(self, nbytes: int):
        self.now -= nbytes

    def settle(self):
        """The peak of the last engine add: in place (no new bytes) if both its inputs are gone."""
        if self.engine_add is not None:
            before, inputs = self.engine_add
            in_place = all(ref() is None for ref in inputs)
            self.peak = max(self.peak, before if in_place else self.now)
            self.engine_add = None


def random_micro_batch(config: LlamaConfig, batch: int, seq: int) -> data.Batch:
    """batch x seq random tokens whose second halves carry the loss (a real batch: collate finds
    the target positions in the data)."""
    gen = torch.Generator().manual_seed(0)
    examples = [data.Example(torch.randint(0, config.vocab_size, (seq,), generator=gen, dtype=torch.int32),
                             torch.arange(seq) >= seq // 2) for _ in range(batch)]
    return data.collate(examples, pad_id=0)


def run_steps(config: LlamaConfig, micro: data.Batch, device: torch.device, dtype: str = "bf16",
              optimizer_in_backward: bool = False, lora_rank: int = 0, lora_targets=lora.TARGETS,
              grad_checkpointing: bool = False, accumulate: int = 1, steps: int = 2):
    """`steps` training steps of a new random model, each summing the gradients of `accumulate`
    passes over micro (memory.estimate's settings; the model built as train.training_model builds
    it). No gradient clipping: its norm would need real numbers."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(memory.weights_dtype(dtype, lora_rank))
    try:
        with device:
            model = Llama(config).train()
    finally:
        torch.set_default_dtype(default)
    if lora_rank:
        lora.add_adapters(model, lora_rank, 16.0, lora_targets)
    model.gradient_checkpointing = grad_checkpointing
    optimizer = optim.build_optimizer(model, 1e-5, 0.01, optimizer_in_backward, device)
    micro = micro.to(device)
    for _ in range(steps):
        for _ in range(accumulate):
            (loss.loss_sum(model, micro, autocast=dtype == "bf16") / (accumulate * len(micro.targets))).backward()
        if not optimizer_in_backward:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def traced_peak(config: LlamaConfig, batch: int, seq: int, fake: bool = True, **settings) -> int:
    """The peak bytes of live tensors over run_steps(**settings) on a micro-batch of batch x seq.
    fake=False runs the step on real tensors: for small models, to check that fake ones trace the same."""
    micro = random_micro_batch(config, batch, seq)
    tracker = LiveBytes()
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext(), tracker:
        run_steps(config, micro, torch.device("cpu"), **settings)
        tracker.settle()
    return tracker.peak


def measured_peak(config: LlamaConfig, batch: int, seq: int, device: torch.device, **settings) -> int:
    """The same steps run for real on device, no tracer: memory.memory_probe's peak (on a GPU the
    memory torch allocated, from before the model was built). The GPU check compares it with the trace."""
    micro = random_micro_batch(config, batch, seq)
    peak = memory.memory_probe(device)
    run_steps(config, micro, device, **settings)
    return peak()
