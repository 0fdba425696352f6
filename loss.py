"""The loss that fine-tuning minimises: cross-entropy on the reply tokens only, summed, and divided
by the reply tokens of the whole optimizer step.

    loss_sum(model, batch, autocast)             the summed cross-entropy of one micro-batch's targets
    forward_backward(model, micro_batches, ...)  the gradient of one optimizer step, and its loss per
                                                 target token (train.train_step then steps)
    validation_loss(model, batches, autocast)    the loss per target token over a validation set
    ChunkedHeadLoss                              the output head's loss and gradients, LOSS_CHUNK
                                                 positions at a time (with gradient checkpointing)

A batch (data.collate) lists the positions whose next token is a target: the reply and its
end-of-turn token, never the prompt. Summing over them and dividing once by the step's count makes
gradient accumulation, and data parallelism, equal one large batch.

References: chunked output-head losses as in Liger Kernel's fused linear cross-entropy (Hsu et al.
2024) and Cut Cross-Entropy (Wijmans et al. 2024), here in plain PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import data
from model import Llama
from runtime import all_sum, sum_gradients

LOSS_CHUNK = 256  # with gradient checkpointing, the positions whose logits exist at once


def loss_sum(model: Llama, batch: data.Batch, autocast: bool) -> torch.Tensor:
    """Summed cross-entropy (fp32) of the target tokens of one micro-batch.

    Right padding only trails real tokens, so plain causal attention (no mask, the fast path)
    is exact for every real token. Only the positions with a loss go through the output head:
    with a 128k vocabulary, the full (B, T, vocab) logits would dominate memory. Even so, 2,048
    reply tokens make 3.7 GB of logits in bf16 and fp32: with gradient checkpointing they are
    formed LOSS_CHUNK positions at a time, with their gradients (ChunkedHeadLoss)."""
    with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        h = model.hidden_states(batch.input_ids)                            # (B, T, d)
        h = h.flatten(0, 1).index_select(0, batch.loss_pos)                 # (N, d)
    if not (model.gradient_checkpointing and model.training) or len(h) <= LOSS_CHUNK:
        return head_loss(model.lm_head, h, batch.targets, autocast)
    return ChunkedHeadLoss.apply(h, model.lm_head.weight, batch.targets, autocast)


def head_loss(lm_head: torch.nn.Linear, h: torch.Tensor, targets: torch.Tensor, autocast: bool) -> torch.Tensor:
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = lm_head(h)                                                 # (N, vocab)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


class ChunkedHeadLoss(torch.autograd.Function):
    """head_loss, LOSS_CHUNK positions at a time, each chunk's gradients formed at once:
    d loss / d logits = softmax(logits) - onehot(target). No chunk's logits outlive it, and the
    backward pass only scales what the forward pass kept (d loss / d h, and d loss / d weight
    unless the head is frozen), so nothing is recomputed. The logits' matmul runs in bf16 under
    autocast, as head_loss's does, the softmax in fp32, and the weight's gradient accumulates in
    the weight's own dtype, in place."""

    @staticmethod
    def forward(ctx, h, weight, targets, autocast: bool):
        compute = torch.bfloat16 if autocast else weight.dtype
        w = weight.to(compute)
        grad_h = torch.empty_like(h)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, len(h), LOSS_CHUNK):
            rows, chunk_targets = h[start:start + LOSS_CHUNK].to(compute), targets[start:start + LOSS_CHUNK]
            d_logits = F.linear(rows, w).float()          # the logits (n, vocab), then in place their gradient
            lse = d_logits.logsumexp(-1)
            total += (lse - d_logits.gather(1, chunk_targets[:, None]).squeeze(1)).sum()
            d_logits.sub_(lse[:, None]).exp_()           # the softmax
            d_logits[torch.arange(len(rows), device=h.device), chunk_targets] -= 1
            d_logits = d_logits.to(compute)
            grad_h[start:start + LOSS_CHUNK] = d_logits @ w
            if grad_weight is not None:
                grad_weight.addmm_(d_logits.T.to(weight.dtype), rows.to(weight.dtype))
            del d_logits  # else it lives on beside the next chunk's logits
        ctx.save_for_backward(grad_h, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        # Scaled in place (the graph is used once): a copy of the head's gradient would add a
        # vocabulary x d matrix to the peak.
        grad_h, grad_weight = ctx.saved_tensors
        return grad_h.mul_(grad_total), None if grad_weight is None else grad_weight.mul_(grad_total), None, None


def count_targets(micro_batches: list[data.Batch]) -> int:
    """Target tokens of one optimizer step; every micro-batch's summed loss is divided by it.
    (Averaging each micro-batch's mean instead would overweight short examples.)"""
    return sum(len(b.targets) for b in micro_batches)


def forward_backward(model: Llama, micro_batches: list[data.Batch], autocast: bool) -> float:
    """Accumulate the gradient of one optimizer step: the same as one forward/backward of the
    concatenated batch. Returns the step's loss per target token. Under torchrun micro_batches
    are this rank's share of the step, and every rank ends with the gradient of the whole step."""
    device = model.embed_tokens.weight.device
    # Counted (over all ranks) before the passes, so that each can run its backward at once.
    n_targets, = all_sum([count_targets(micro_batches)], device)
    total = 0.0
    for batch in micro_batches:
        loss = loss_sum(model, batch, autocast)
        (loss / n_targets).backward()
        total += loss.detach()
    sum_gradients(model)
    total, = all_sum([float(total)], device)
    return total / n_targets


@torch.no_grad()
def validation_loss(model: Llama, batches: list[data.Batch], autocast: bool) -> float:
    """Loss per target token over the whole validation set (under torchrun: batches is this
    rank's share of it)."""
    was_training = model.training
    model.eval()
    total = sum(float(loss_sum(model, b, autocast)) for b in batches)
    model.train(was_training)
    total, count = all_sum([total, count_targets(batches)], model.embed_tokens.weight.device)
    return total / count
