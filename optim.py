"""The optimizer: AdamW at three precisions, the step inside the backward pass, and the lr schedule.

    build_optimizer   AdamW over the trainable parameters (weight decay on matrices only):
                      torch's fused kernel on fp32 weights (--dtype fp32 and bf16, LoRA adapters),
                      or BF16AdamW on bf16 weights (--dtype bf16-pure); wrapped in InBackward on request
    BF16AdamW         AdamW whose weights and both moments are bf16, written back with stochastic rounding
    InBackward        each parameter updated by a hook the moment its gradient is complete
    optimizer_step    clip and step (or, in the backward pass, only report the gradient norm)
    lr_at             linear warm-up, then cosine decay

Memory per parameter: fp32 weights + fp32 gradients + two fp32 moments = 16 bytes (--dtype bf16
keeps these fp32 masters; autocast only runs the matmuls in bf16); bf16-pure = 8 bytes; bf16-pure
with the optimizer in the backward pass = 6 bytes, as the full set of gradients never exists.

References: Loshchilov & Hutter 2019 (AdamW, cosine schedule); Zamirai et al. 2020 and
Gupta et al. 2015 (stochastic rounding for low-precision training); torchtune's
optimizer-in-backward (register_post_accumulate_grad_hook).
"""
from __future__ import annotations

import math

import torch

CHUNK = 1 << 22  # BF16AdamW updates a tensor in slices of this many elements: its fp32 temporaries
                 # (about 7 per element) for a whole 262M-element embedding would take 7 GB


def round_stochastic(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, up or down at random so that the mean is kept: E[round(x)] = x.

    A bf16 number is an fp32 one with the low 16 bits dropped. Adding a random 16-bit integer to
    those bits before dropping them rounds up with probability (distance to the lower bf16 value)
    / (gap between the two): an update far below a weight's resolution still moves it on average.
    Round-to-nearest would drop it every time: at lr 1e-5 most AdamW updates are below 1/256
    of the weight they change, bf16's resolution, and training stalls."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device)
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def round_to_nearest(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16)


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (as torch.optim.AdamW) for bf16 weights: the update is computed in fp32 and the
    weight and both moments are stored back in bf16 with stochastic rounding (the second
    moment too: 0.999 * v is v again under round-to-nearest, so v could never decay)."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps=1e-8,
                 stochastic: bool = True):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps})
        self.round = round_stochastic if stochastic else round_to_nearest  # nearest: bench/precision.py's foil

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)

    def _update(self, p: torch.Tensor, group: dict):
        state = self.state[p]
        if not state:
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state["step"] += 1
        (beta1, beta2), lr, step = group["betas"], group["lr"], float(state["step"])
        bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
        slices = (t.view(-1).split(CHUNK) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"]))
        for w, g, m, v in zip(*slices):
            g = g.float()
            m32 = m.float().lerp_(g, 1 - beta1)
            v32 = v.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
            w32 = w.float().mul_(1 - lr * group["weight_decay"])                 # decoupled weight decay
            w32.addcdiv_(m32, (v32 / bias2).sqrt_().add_(group["eps"]), value=-lr / bias1)
            for stored, exact in ((w, w32), (m, m32), (v, v32)):
                stored.copy_(self.round(exact))


class InBackward:
    """--optimizer-in-backward: one optimizer per parameter, stepped by a hook as soon as the
    backward pass has accumulated that parameter's gradient, which is then freed. At most a few
    gradients exist at once, never the whole set: 2 bytes per parameter saved in bf16-pure.

    The price: each step runs once per backward pass (so no gradient accumulation), and no
    parameter can wait for the global gradient norm (so no clipping by it). The norm is still
    summed as the gradients pass, for the log."""

    def __init__(self, optimizers: dict[torch.nn.Parameter, torch.optim.Optimizer]):
        self.optimizers = optimizers
        self.squared_norm = 0.0
        for p in optimizers:
            p.register_post_accumulate_grad_hook(self._step)

    def _step(self, p: torch.nn.Parameter):
        # summed in fp32 a slice at a time: an fp32 copy of the 1B embedding's gradient would be 1 GB
        slices = p.grad.detach().flatten().split(CHUNK)
        self.squared_norm = self.squared_norm + sum(torch.linalg.vector_norm(s, dtype=torch.float32) ** 2 for s in slices)
        self.optimizers[p].step()
        p.grad = None

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def grad_norm(self) -> float:
        """The global norm of the gradients of the step just taken (and a fresh sum for the next)."""
        norm, self.squared_norm = math.sqrt(float(self.squared_norm)), 0.0
        return norm

    def state_dict(self) -> dict:
        return {"per_parameter": [opt.state_dict() for opt in self.optimizers.values()]}

    def load_state_dict(self, state: dict):
        for opt, opt_state in zip(self.optimizers.values(), state["per_parameter"], strict=True):
            opt.load_state_dict(opt_state)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, in_backward: bool,
                    device: torch.device):
    """AdamW over the parameters that train (BF16AdamW where they are bf16); weight decay on the
    matrices (embeddings, projections, adapters) only: decaying norm gains towards 0 would shrink
    activations, which is not the regularisation we want."""
    params = [p for p in model.parameters() if p.requires_grad]   # a tied matrix appears once
    bf16_weights = params[0].dtype == torch.bfloat16

    def adamw(group_params, decay):
        if bf16_weights:
            return BF16AdamW(group_params, lr, decay)
        # The fused kernel updates every tensor in one pass (5x faster than the per-tensor loop on CPU).
        return torch.optim.AdamW(group_params, lr=lr, weight_decay=decay, fused=device.type in ("cuda", "cpu"))

    def decay_of(p):
        return weight_decay if p.dim() >= 2 else 0.0

    if in_backward:
        return InBackward({p: adamw([p], decay_of(p)) for p in params})
    return adamw([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], weight_decay)


def optimizer_step(optimizer, params, grad_clip: float) -> float:
    """Clip the global gradient norm to grad_clip (0: not at all), step, and free the gradients;
    returns the norm before clipping. An InBackward optimizer has already stepped."""
    if isinstance(optimizer, InBackward):
        return optimizer.grad_norm()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def lr_at(step: int, total_steps: int, lr: float, warmup_ratio: float, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up to lr, then cosine decay
    to lr * min_lr_ratio at the last step."""
    warmup = round(warmup_ratio * total_steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - 1 - warmup)           # 0 -> 1
    min_lr = lr * min_lr_ratio
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
