"""LoRA: train a low-rank update beside each chosen linear layer, the layer itself frozen.

A frozen weight W (out, in) gets two small trainable matrices A (rank, in) and B (out, rank);
the layer computes W x + (alpha / rank) * B A x. B starts at zero, so training starts from the
base model exactly; A starts random (as PEFT's default), so B's first gradients are not zero.
Only A and B train, in fp32 (their AdamW state is rank * (in + out) numbers per layer, a few MB),
while W stays in the run's dtype and needs neither gradients nor optimizer state.

    add_adapters(model, rank, alpha, targets)  replace the targeted nn.Linear layers in place
    merged_state(model)      the state dict with each W + scale * B A: what best/ and last/ hold,
                             plain Hugging Face checkpoints that any Llama loader reads
    adapter_state(model) / load_adapter_state(model, state)   A and B alone (for --resume)
    save_peft(model, folder, base_model)   the adapter in PEFT's layout: adapter_config.json +
                             adapter_model.safetensors (peft.PeftModel.from_pretrained loads it)

Reference: Hu et al. 2021 (LoRA); Hugging Face PEFT's tensor names and adapter_config.json.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from files import write_atomic, write_json

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every linear in a block


class LoRALinear(nn.Module):
    """A frozen nn.Linear (its `weight` keeps its name, so checkpoint names do not change) plus
    B A, scaled by alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.weight = base.weight.requires_grad_(False)
        out_features, in_features = base.weight.shape
        kw = dict(dtype=torch.float32, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's (and PEFT's) initialisation
        self.scale = alpha / rank

    def forward(self, x):
        # The adapters compute in the dtype of x, the frozen layer's (bf16 on a bf16 base, as autocast
        # would): an fp32 copy of x would be saved for the backward pass by every adapter that reads
        # it, and the sum is rounded to x's dtype anyway. A and B, their gradients and AdamW state stay fp32.
        update = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale
        return F.linear(x, self.weight) + update

    def merged_weight(self) -> torch.Tensor:
        return (self.weight.float() + self.scale * self.lora_B @ self.lora_A).to(self.weight.dtype)


def add_adapters(model: nn.Module, rank: int, alpha: float, targets=TARGETS) -> list[str]:
    """Freeze the whole model, then put a LoRALinear in place of every nn.Linear whose name ends
    in one of `targets` (the output head is never adapted); returns the adapted layers' names."""
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"--lora-targets: {', '.join(sorted(unknown))} is not a linear layer of a block "
                         f"(choose among {', '.join(TARGETS)})")
    model.requires_grad_(False)
    adapted = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    for name in adapted:
        parent, child = name.rsplit(".", 1)
        owner = model.get_submodule(parent)
        setattr(owner, child, LoRALinear(getattr(owner, child), rank, alpha))
    return adapted


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with the adapters folded into their weights, and without A and B."""
    state = {name: t for name, t in model.state_dict().items() if ".lora_" not in name}
    for name, layer in adapters(model).items():
        state[f"{name}.weight"] = layer.merged_weight()
    return state


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t for name, t in model.state_dict().items() if ".lora_" in name}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]):
    expected = adapter_state(model)
    if state.keys() != expected.keys():
        raise ValueError(f"the saved adapters ({len(state)} tensors) do not fit this model's "
                         f"({len(expected)}): were --lora-rank or --lora-targets changed?")
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(state[name])


def save_peft(model: nn.Module, folder: Path, base_model: str):
    """The adapters alone, as PEFT writes them: tensor names under base_model.model (with the
    Hugging Face model's `model.` prefix), lora_A/lora_B as `.weight`, and the config that says
    which layers they adapt and how they scale."""
    layers = adapters(model)
    if not layers:
        return
    first = next(iter(layers.values()))
    rank = first.lora_A.shape[0]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": rank, "lora_alpha": first.scale * rank, "lora_dropout": 0.0, "bias": "none",
              "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
              "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False}
    tensors = {f"base_model.model.model.{name}.{part}.weight": getattr(layer, part).detach().contiguous().cpu()
               for name, layer in layers.items() for part in ("lora_A", "lora_B")}
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "adapter_model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    write_json(folder / "adapter_config.json", config)
