"""Memory a training run needs: an estimate before it starts, and the peak it measured.

    estimate(config, ...)   bytes of weights, gradients, optimizer state, activations and logits for
                            one micro-batch, from the shapes alone (no model is built)
    plan(config, ...)       the estimate of a run's largest micro-batch, under its MemoryFlags
    memory_probe(device)    from now on, the peak above the memory held now: allocated CUDA memory
                            on a GPU, the process's resident set size (RSS) on a CPU
    readable(n)             bytes in decimal GB (or MB), the units GPU cards are sold in

The estimate follows what this code keeps alive, per token of the micro-batch:
- weights: 4 bytes per parameter (fp32, and bf16's fp32 masters) or 2 (bf16-pure); under LoRA the
  frozen base in the run's dtype plus fp32 adapters;
- gradients: the trainable parameters' dtype; with the optimizer in the backward pass only the
  largest single gradient (the embedding's, which fills over the whole backward pass). They grow
  through the backward pass and are freed after the optimizer step, so the next forward pass
  holds none, unless the step accumulates them over several micro-batches;
- optimizer state: two AdamW moments per trainable parameter (fp32, or bf16 in bf16-pure), and
  bf16-pure's fp32 temporaries for one slice of a parameter while it is updated;
- activations: what autograd saves in one block (block_activation_bytes: the RMSNorms' fp32
  inputs, the matmuls' inputs, attention's q, k, v, output and logsumexp, SwiGLU's three wide
  tensors; under LoRA the adapters' inputs instead of the frozen layers'), for every block, or
  with gradient checkpointing only each block's input plus one block recomputed; the gradients
  of a block's activations while its backward pass runs; RoPE's cos and sin for every position
  (fp32), which every block reads; the final norm's saved tensors and the rows the head reads
  (chunked, beside their gradient);
- logits: the positions with a loss times the vocabulary, in fp32 three times at the log-softmax's
  backward pass (its saved output, the gradient it gets and the one it passes on; the logits and
  their fp32 copy are gone by then); with gradient checkpointing only a chunk of positions at a
  time, as logits and their fp32 copy, which becomes their gradient in place (loss.ChunkedHeadLoss);
- weight copies: under autocast (--dtype bf16), the bf16 copy of every trained matrix, each
  alive until its block's backward pass (with checkpointing, until the blocks' forward pass ends);
  under LoRA on a bf16 base, likewise the adapters' bf16 copies;
- the embedding's gradient as the backward pass forms it, before adding it to the parameter's
  (on a CPU torch forms it in fp32 first).
The total is the largest of the phases in which these live together (estimate's docstring).
bench/memory_trace.py checks it against the tensors a real step holds, traced one by one at the
real models' shapes: on the README's table it lies between 0.2 % below and 1.6 % above them.
Not counted: the framework itself (the CUDA context, the allocator's slack, Python) and the
kernels' own workspaces.
"""
from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch

import lora
import optim
from model import LlamaConfig
from runtime import option


@dataclass(kw_only=True)
class MemoryFlags:
    """The flags that decide how much memory training takes (the README's memory table): inherited
    by train.TrainConfig, and by pipeline.PipelineConfig, which passes them to stages 1 and 3."""
    dtype: str = option("bf16", "bf16: autocast matmuls with fp32 master weights and AdamW state (16 bytes per "
                        "parameter); bf16-pure: weights, gradients and AdamW state in bf16, updated with stochastic "
                        "rounding (8 bytes); fp32: all fp32", choices=("bf16", "bf16-pure", "fp32"))
    optimizer_in_backward: bool = option(False, "update each parameter as soon as its gradient is complete and free "
                                         "that gradient, so the full set of gradients never exists (saves 2 bytes "
                                         "per parameter in bf16-pure, 4 in fp32); needs --grad-accum 1 (so one "
                                         "process: ranks share a step's micro-batches) and no gradient clipping (no "
                                         "global norm exists to clip by: train.py wants --grad-clip 0, the pipeline "
                                         "sets it)")
    lora_rank: int = option(0, "LoRA: train a rank-R update beside each targeted linear layer while the model "
                            "stays frozen in the run's dtype (bf16 for bf16 and bf16-pure); the adapters train in "
                            "fp32 and compute in the frozen layers' dtype. best/ and last/ hold the merged weights, "
                            "best-adapter/ and last-adapter/ the adapter alone in PEFT's layout (0: a full fine-tune)")
    lora_alpha: float = option(16.0, "LoRA: the update is scaled by alpha / rank")
    lora_targets: str = option(",".join(lora.TARGETS), "LoRA: the linear layers of each block that get an adapter")
    grad_checkpointing: bool = option(False, "recompute each block's activations in the backward pass: "
                                      "less memory, about a third more compute")


FLAGS = tuple(f.name for f in fields(MemoryFlags))


def linear_shapes(c: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of a block."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    d, f = c.hidden_size, c.intermediate_size
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def parameter_count(c: LlamaConfig) -> int:
    block = sum(i * o for i, o in linear_shapes(c).values()) + 2 * c.hidden_size
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    return c.vocab_size * c.hidden_size + head + c.num_hidden_layers * block + c.hidden_size


# The input each adapted layer reads: q, k and v share one, and o_proj's is attention's output.
LAYER_INPUT = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "o_proj": "attention output",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "down"}


def weights_dtype(dtype: str, lora_rank: int) -> torch.dtype:
    """The dtype a model is loaded in to train: fp32 (the master copy under bf16 autocast), bf16
    for bf16-pure; with LoRA the frozen base in bf16 (fp32 under --dtype fp32)."""
    return torch.bfloat16 if dtype == "bf16-pure" or (lora_rank and dtype != "fp32") else torch.float32


def activation_dtypes(dtype: str, lora_rank: int) -> tuple[int, int]:
    """Bytes per element of the matmuls' results (bf16 but in fp32 runs) and of the residual
    stream, which is in the weights' dtype: fp32 under autocast, bf16 where the weights are bf16
    (bf16-pure, and LoRA's frozen bf16 base)."""
    compute = 4 if dtype == "fp32" else 2
    return compute, weights_dtype(dtype, lora_rank).itemsize


def block_activation_bytes(c: LlamaConfig, dtype: str, lora_rank: int = 0, lora_targets=lora.TARGETS) -> int:
    """Bytes autograd saves per token in one decoder block, the block's input included where it is
    saved: exactly the tensors tests/test_memory.py counts on a real block in each mode. dtype:
    fp32, bf16 (fp32 weights and residual stream, bf16 matmuls under autocast) or bf16-pure."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    d, f, heads = c.hidden_size, c.intermediate_size, c.num_attention_heads
    autocast = dtype == "bf16" and not lora_rank  # LoRA's frozen base is bf16: autocast casts only the adapters
    compute, residual = activation_dtypes(dtype, lora_rank)
    norms = 2 * (4 * d + 4)                                      # each RMSNorm's fp32 input and 1 / rms
    attention = compute * (2 * q + 2 * kv) + 4 * heads           # q, k, v, output (o_proj's input); logsumexp
    swiglu = 3 * compute * f                                     # gate, silu(gate), up
    if not lora_rank:
        norms += 2 * residual * d                                # each norm's output, for its weight's gradient
        # the matmuls' inputs, for their weights' gradients: autocast casts attention's for each of q,
        # k and v, and the MLP's for gate and up; down's (the SwiGLU product) is in compute dtype already
        inputs = (5 * compute * d if autocast else 2 * residual * d) + compute * f
        return norms + inputs + attention + swiglu
    # Under LoRA the frozen layers save nothing for weight gradients; each adapter saves its input,
    # read as it is (adapters reading the same tensor share it; o_proj's is attention's output,
    # counted above), and A x.
    shapes = linear_shapes(c)
    widths = {LAYER_INPUT[t]: shapes[t][0] for t in lora_targets if t != "o_proj"}  # one per shared input
    inputs = compute * sum(widths.values())
    products = len(lora_targets) * compute * lora_rank
    return norms + inputs + products + attention + swiglu


def trainable_count(c: LlamaConfig, lora_rank: int = 0, lora_targets=lora.TARGETS) -> int:
    """Parameters that train: all of them, or LoRA's adapters (A and B of each targeted layer)."""
    shapes = linear_shapes(c)
    return c.num_hidden_layers * sum(lora_rank * (shapes[t][0] + shapes[t][1]) for t in lora_targets) \
        if lora_rank else parameter_count(c)


def trained_dtype_bytes(dtype: str, lora_rank: int) -> int:
    """Bytes per element of the trained parameters, their gradients and moments: bf16 in
    bf16-pure, else fp32 (bf16's masters, and LoRA's adapters in every dtype)."""
    return 2 if dtype == "bf16-pure" and not lora_rank else 4


def held_bytes(c: LlamaConfig, dtype: str, optimizer_in_backward: bool, lora_rank: int, lora_targets) -> dict[str, int]:
    """What a run holds all step long (weights, gradients, AdamW's two moments), and what the
    optimizer adds while it updates the largest parameter."""
    trainable, trainable_bytes = trainable_count(c, lora_rank, lora_targets), trained_dtype_bytes(dtype, lora_rank)
    if lora_rank:
        frozen = parameter_count(c) * (4 if dtype == "fp32" else 2)
        largest = max(lora_rank * linear_shapes(c)[t][1] for t in lora_targets)
    else:
        frozen, largest = 0, c.vocab_size * c.hidden_size
    return {"weights": frozen + trainable * trainable_bytes,
            "gradients": (largest if optimizer_in_backward else trainable) * trainable_bytes,
            "optimizer": 2 * trainable * trainable_bytes,
            "optimizer_temporaries": update_temporaries(largest, trainable_bytes)}


def update_temporaries(elements: int, trained_bytes: int) -> int:
    """What updating a parameter of `elements` elements adds: BF16AdamW updates a slice of at most
    optim.CHUNK elements at a time through fp32 temporaries (the gradient, both moments and the
    weight, and the stochastic rounding's), 28 bytes each. torch's fused AdamW (fp32) makes none."""
    return 28 * min(optim.CHUNK, elements) if trained_bytes == 2 else 0


def pass_bytes(c: LlamaConfig, tokens: int, targets: int, dtype: str, lora_rank: int, lora_targets,
               chunk: int) -> dict[str, int]:
    """What a micro-batch of `tokens` tokens, `targets` of them with a loss, makes on its way through
    the model: one block's activations and their gradients, RoPE's angles, the head's inputs, the
    logits (chunk > 0: only that many positions' at once, loss.ChunkedHeadLoss), and autocast's bf16
    copy of one block's trained matrices and of the output head."""
    compute, residual = activation_dtypes(dtype, lora_rank)
    rows, chunked = chunk or targets, chunk > 0
    trained_per_block = trainable_count(c, lora_rank, lora_targets) // c.num_hidden_layers if lora_rank else \
        sum(i * o for i, o in linear_shapes(c).values())
    # The final norm saves its fp32 input and, for its weight's gradient, its output. The head's rows
    # exist, chunked, beside their gradient (both formed in the forward pass); whole, the matmul saves
    # them for its weight's gradient. LoRA trains neither the norm's weight nor the head.
    trained = 0 if lora_rank else 1
    norm_saved, head_rows = 4 + trained * residual, 2 * residual if chunked else trained * compute
    return {
        "block": tokens * block_activation_bytes(c, dtype, lora_rank, lora_targets),
        # The gradients of one block's activations, at most at once: in the MLP's backward pass those
        # of the SwiGLU product, of silu(gate) and of up (three wide, one of which replaces the
        # product's saved input), and of the residual stream (the block's output, its input, and one
        # in between).
        "block_gradients": tokens * (2 * compute * c.intermediate_size + 3 * residual * c.hidden_size),
        "rope": 2 * tokens * c.head_dim * 4,  # RoPE's cos and sin of every position, in fp32
        "head_inputs": c.hidden_size * (tokens * norm_saved + targets * head_rows),
        # Chunked: a chunk's logits in the matmul's dtype and in fp32. Unchunked, the most at once is in
        # the log-softmax's backward pass: its saved output and two gradients, in fp32 (the logits, 2 + 4
        # bytes, and the output live together only in the forward pass, and so stay below that).
        "logits": rows * c.vocab_size * (((compute if compute != 4 else 0) + 4) if chunked else 12),
        # The bf16 copies of fp32 matrices that the matmuls read (autocast's of the masters, LoRA's of
        # its adapters on a bf16 base): autograd saves a block's until that block's backward pass; with
        # checkpointing autocast's cache holds them until the blocks' forward pass ends, and a
        # recomputed block makes its own again. The head's lives from its forward to its backward.
        "block_copies": 2 * trained_per_block if compute == 2 and trained_dtype_bytes(dtype, lora_rank) == 4 else 0,
        "head_copy": 2 * c.vocab_size * c.hidden_size if dtype == "bf16" and not lora_rank else 0}


def gradients_beside_blocks(c: LlamaConfig, all_gradients: int, head_gradient: int, optimizer_in_backward: bool,
                            chunked: bool, accumulating: bool) -> tuple[int, int]:
    """The parameters' gradients beside the first block's backward pass and beside the last one's.
    With the optimizer in the backward pass each is freed once applied, but a tied head's waits for
    the embedding's; an untied head's, formed in the forward pass (chunked), is gone before the
    blocks', and unchunked it forms just before them, beside the logits' gradient. Else every
    gradient exists once the blocks are done, but an untied embedding's own, formed last (unless
    carried), and a tied head's new one waits beside a carried sum."""
    if optimizer_in_backward:
        return 0 if chunked and not c.tie_word_embeddings else head_gradient, \
            head_gradient if c.tie_word_embeddings else 0
    waiting = head_gradient if accumulating and c.tie_word_embeddings else 0
    untied_embedding = 0 if c.tie_word_embeddings or accumulating else head_gradient
    return head_gradient, all_gradients + waiting - untied_embedding


def estimate(c: LlamaConfig, batch: int, seq: int, targets: int, dtype: str, optimizer_in_backward: bool = False,
             lora_rank: int = 0, lora_targets=lora.TARGETS, grad_checkpointing: bool = False,
             loss_chunk: int = 0, accumulating: bool = False, device: str = "cuda") -> dict[str, int]:
    """Bytes of each part of a training step's peak for a micro-batch of batch x seq tokens of which
    `targets` carry a loss. dtype: bf16 (fp32 masters, autocast), bf16-pure or fp32. loss_chunk:
    with gradient checkpointing, how many positions' logits exist at once (0: all). accumulating:
    the step sums gradients over several micro-batches, so they live through every pass.

    `total` is the weights and optimizer state plus the largest of what lives together in each
    phase of the step: the forward pass, the backward pass of the first block it reaches (beside
    the head's gradient) and of the last (beside every block's gradient), the embedding's gradient
    as it forms, and the optimizer step. Gradients grow through the backward pass and, without
    accumulation, are freed after the step: none exist in the next forward pass."""
    held = held_bytes(c, dtype, optimizer_in_backward, lora_rank, lora_targets)
    tokens, layers, residual = batch * seq, c.num_hidden_layers, activation_dtypes(dtype, lora_rank)[1]
    chunked = grad_checkpointing and 0 < loss_chunk < targets
    p = pass_bytes(c, tokens, targets, dtype, lora_rank, lora_targets, loss_chunk if chunked else 0)
    # The head's gradient (chunked: formed in the forward pass) comes first in the backward pass; tied,
    # it waits there for the embedding's, and is then their sum: the parameter's gradient, unless the
    # step's earlier micro-batches left one (carried), to which it is added at the very end.
    trained_bytes = trained_dtype_bytes(dtype, lora_rank)
    head_gradient = 0 if lora_rank else c.vocab_size * c.hidden_size * trained_bytes
    carried = held["gradients"] if accumulating else 0
    first_head, before_embedding = gradients_beside_blocks(c, held["gradients"], head_gradient, optimizer_in_backward,
                                                           chunked, accumulating)
    # With the optimizer in the backward pass, a block's backward pass updates the block's parameters.
    largest_in_block = max(i * o for i, o in linear_shapes(c).values())
    in_backward = update_temporaries(largest_in_block, trained_bytes) if optimizer_in_backward else 0
    if grad_checkpointing:
        kept = layers * tokens * residual * c.hidden_size  # each block's input
        activations = kept + p["block"] + p["block_gradients"]
        recomputed = p["block"] + p["block_copies"] + p["block_gradients"] + in_backward
        head = p["head_copy"] + p["head_inputs"] + p["logits"] + (head_gradient if chunked else 0)
        forward = carried + kept + max(layers * p["block_copies"], head)
        first_block = carried + first_head + kept + recomputed
        last_block = before_embedding + tokens * residual * c.hidden_size + recomputed
    else:
        activations = layers * p["block"] + p["block_gradients"]
        # Under LoRA the first block's input, the frozen embedding's output, needs no gradient: its
        # first norm saves nothing.
        saved = layers * (p["block"] + p["block_copies"]) - (tokens * (4 * c.hidden_size + 4) if lora_rank else 0)
        # the forward pass, until the logits' gradient is formed
        forward = carried + saved + p["head_copy"] + p["head_inputs"] + p["logits"]
        first_block = carried + first_head + saved + p["block_gradients"] + in_backward
        last_block = before_embedding + p["block"] + p["block_copies"] + p["block_gradients"] + in_backward
    # Every block reads RoPE's angles: they live through both passes.
    forward, first_block, last_block = (phase + p["rope"] for phase in (forward, first_block, last_block))
    # The embedding's gradient is formed whole (and then added to the tied head's): on a CPU in fp32 first.
    embedding_gradient = 0 if lora_rank else \
        c.vocab_size * c.hidden_size * (trained_bytes + (4 if device == "cpu" else 0))
    # Then the update: every parameter's at once, or (the optimizer in the backward pass) the
    # embedding's, whose gradient is then held["gradients"], the largest one.
    after_backward = max(before_embedding + embedding_gradient, held["gradients"] + held["optimizer_temporaries"])
    return {**held, "activations": activations, "logits": p["logits"],
            "weight_copies": layers * p["block_copies"] + p["head_copy"], "embedding_gradient": embedding_gradient,
            "total": held["weights"] + held["optimizer"] + max(forward, first_block, last_block, after_backward)}


def plan(c: LlamaConfig, lengths: list[int], targets: list[int], micro_batches: list[list[int]],
         flags: MemoryFlags, loss_chunk: int = 0, accumulating: bool = False, device: str = "cuda") -> dict:
    """estimate() under a run's flags for the micro-batch (a list of example indices, into the
    examples' token `lengths` and `targets` with a loss) that needs the most: its batch, seq,
    targets, bytes, and whether it accumulates (a process runs several micro-batches per optimizer step)."""
    plans = []
    for ids in micro_batches:
        shape = {"batch": len(ids), "seq": max(lengths[i] for i in ids), "targets": sum(targets[i] for i in ids)}
        plans.append({**shape, "accumulating": accumulating, "bytes": estimate(
            c, **shape, dtype=flags.dtype, optimizer_in_backward=flags.optimizer_in_backward,
            lora_rank=flags.lora_rank, lora_targets=flags.lora_targets.split(","),
            grad_checkpointing=flags.grad_checkpointing, loss_chunk=loss_chunk, accumulating=accumulating,
            device=device)})
    return max(plans, key=lambda p: p["bytes"]["total"])


def memory_probe(device: torch.device):
    """Start measuring peak memory now; the returned function gives the peak above this point:
    memory allocated by torch on a GPU, the process's resident set size (RSS) on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        return lambda: torch.cuda.max_memory_allocated(device) - base
    try:  # Linux: writing 5 resets the high-water mark VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        base = proc_status("VmRSS")
        # The kernel counts RSS in per-CPU batches, so a step that added nothing can read a few
        # pages below where it began: no peak is below nothing.
        return lambda: max(0, proc_status("VmHWM") - base)
    except OSError:  # elsewhere: the lifetime peak, which may be an earlier one's
        scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kilobytes
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale - base


def proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise KeyError(key)


def readable(n: float) -> str:
    """Bytes in decimal units, the ones GPU cards are sold in."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
