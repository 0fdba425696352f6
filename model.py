"""Llama 3.2, written out plainly: the network and its KV cache, nothing else.

Read this file top to bottom: config, the three building blocks (RMSNorm, rotary
position embedding, attention + MLP), the decoder block, the model, and the static
KV cache. Reading and writing Hugging Face checkpoint folders is checkpoint.py's job.

The same code runs every Llama-architecture checkpoint on the hub that uses
SwiGLU, RMSNorm and (optionally) llama3 RoPE scaling: Llama 3.2 1B/3B, SmolLM2,
TinyLlama. Module names follow Hugging Face's (`embed_tokens`, `layers.N.self_attn.q_proj`,
...), so HF checkpoints load by name with one prefix added (checkpoint.py).

References: Meta's llama3 repo (model.py), Hugging Face `modeling_llama.py`,
Su et al. 2021 (RoPE), Ainslie et al. 2023 (grouped-query attention),
Shazeer 2020 (SwiGLU), Zhang & Sennrich 2019 (RMSNorm).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------- config

@dataclass
class LlamaConfig:
    """The fields of a Hugging Face config.json that a Llama needs (checkpoint.config_from_hf)."""
    vocab_size: int
    hidden_size: int                  # d_model
    intermediate_size: int            # width of the SwiGLU MLP
    num_hidden_layers: int
    num_attention_heads: int          # query heads
    num_key_value_heads: int          # key/value heads (GQA: fewer than query heads)
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # llama3: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False  # Llama 3.2 1B/3B: the output head reuses the embedding matrix
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)


# ----------------------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    """x / rms(x) * weight. Normalise in fp32, cast back to the input dtype, then scale:
    the same order as HF, so bf16 results agree bit for bit."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Rotation frequency of each pair of channels, with Llama 3's long-context scaling.

    llama3 scaling splits the frequencies in three bands by wavelength (in tokens):
    - short wavelengths (< original_context / high_freq_factor) stay as they are,
    - long wavelengths (> original_context / low_freq_factor) are slowed by `factor`
      (32 for Llama 3.2, 8 for 3.1: read from config.json, never hard-coded),
    - in between, a smooth blend of the two.
    """
    d = config.head_dim
    # Explicit device: this stays a real fp32 tensor even when the model is built on "meta".
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d)
    if config.rope_scaling is None:
        return inv_freq
    s = config.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)             # 0 at the long end, 1 at the short end
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, blended)
    return torch.where(wavelen < old_context / high, inv_freq, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin of position * frequency, computed in fp32 for any (per-row) positions.

    Layout note: HF checkpoints rotate the two *halves* of each head (channel i with
    channel i + head_dim/2), while Meta's original code rotates *adjacent* pairs
    (2i, 2i+1) as complex numbers. HF permuted the q/k weights when converting, so with
    HF weights we must use the half-split layout; Meta-style rotation garbles the output.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) would round the frequencies and ruin large positions:
        # follow the device moves, but keep this table in fp32.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, positions):                                     # positions: (B, T) long
        angles = positions[..., None].float() * self.inv_freq          # (B, T, head_dim/2)
        angles = torch.cat([angles, angles], dim=-1)                   # (B, T, head_dim)
        return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each (x[i], x[i + d/2]) pair by its angle; x: (B, heads, T, head_dim). Done in fp32."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated_half = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[:, None], sin[:, None]                              # broadcast over heads
    return (x32 * cos + rotated_half * sin).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention: n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer  # which of the cache's layers holds this one's keys and values
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"num_attention_heads={self.n_heads} is not a multiple of "
                             f"num_key_value_heads={self.n_kv_heads}")
        d, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, positions=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # this step's keys/values join the cached ones
            k, v = cache.update(self.layer, k, v, positions)                           # (B, nkv, S, hd)
        if mask is None:  # nothing cached before these tokens: plain causal attention (fast kernels)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:             # mask: (B, 1, T, S) bool, True = may attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))                       # (B, T, d)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache=None, positions=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- the model

class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # one tensor, two uses

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied matrix is counted once

    def forward(self, input_ids, cache: "KVCache | None" = None):
        """input_ids (B, T) -> logits (B, T, vocab)."""
        return self.lm_head(self.hidden_states(input_ids, cache))

    def hidden_states(self, input_ids, cache: "KVCache | None" = None):
        """input_ids (B, T) -> final normalised hidden states (B, T, d), before the output head.
        Training uses this to project only the positions that carry a loss onto the vocabulary,
        and generation to project only each prompt's last token.

        Without a cache, position t is t and attention is causal. A batch of rows of different
        lengths is right-padded: padding then follows every real token, so causal attention is
        exact for the real tokens, whatever the padding computes. With a cache, the tokens
        continue each row where it stopped, and the row's next tokens overwrite its padding's
        slots; their keys and values are written into the cache, and the caller then counts them
        (cache.advance): the forward pass changes no other state of the cache.
        """
        B, T = input_ids.shape
        if cache is not None:
            positions = cache.next_positions(T)
            mask = cache.mask(positions)
        else:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
            mask = None
        cos, sin = self.rotary(positions)

        x = self.embed_tokens(input_ids)                                # (B, T, d)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                # Recompute the block in the backward pass instead of storing its activations.
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, positions)
        return self.norm(x)

    def new_cache(self, batch_size: int, max_len: int, static: bool = False) -> "KVCache":
        p = self.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, p.dtype, p.device, static)


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Static, preallocated keys and values for every layer, for batched generation.

    Each row fills its own slots from 0: slot = position, so a row's cache never depends on
    the other rows, and a row can be replaced by a new prompt while the others go on
    (`insert`, continuous batching). `lengths` counts each row's cached tokens: its next
    position and next slot. `filled` is a host-side bound on max(lengths), so attention
    reads only the slots in use without asking the device. `static` caches are read whole
    every step instead: one shape for torch.compile and CUDA graphs.
    Only the n_kv_heads key/value heads are stored (GQA saves memory here, not only flops).
    """

    def __init__(self, config: LlamaConfig, batch_size, max_len, dtype, device, static=False):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)       # (L, B, nkv, max_len, hd)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.filled = 0
        self.max_len, self.static = max_len, static
        if static:  # updated in place only: CUDA graphs may read them at fixed addresses
            for t in (self.k, self.v, self.lengths):
                torch._dynamo.mark_static_address(t)

    def next_positions(self, T: int) -> torch.Tensor:
        """Positions (B, T) of T new tokens after each row's cached ones."""
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)

    def n_keys(self, T: int) -> int:
        """How many slots attention reads while T new tokens are written: all of a static cache
        (one shape for every step), else only those some row has filled."""
        return self.max_len if self.static else min(self.max_len, self.filled + T)

    def mask(self, positions: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, T, S) over the first S = n_keys slots: slot = position, so a token sees exactly
        the slots up to its own position. None for an empty cache: plain causal attention."""
        if not self.static and self.filled == 0:
            return None
        slot = torch.arange(self.n_keys(positions.shape[1]), device=positions.device)
        return (slot <= positions[:, :, None])[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Write one layer's new keys and values (B, nkv, T, hd) into each row's own slots
        (slot = position), and return what attention reads: the first n_keys slots (B, nkv, S, hd)."""
        B, _, T, _ = k.shape
        rows = torch.arange(B, device=k.device)[:, None]
        slots = positions.clamp(max=self.max_len - 1)  # clamps only rows past their end, never read
        self.k[layer, rows, :, slots] = k.transpose(1, 2)                      # (B, T, nkv, hd)
        self.v[layer, rows, :, slots] = v.transpose(1, 2)
        n = self.n_keys(T)
        return self.k[layer, :, :, :n], self.v[layer, :, :, :n]

    def advance(self, T: int, real_tokens: torch.Tensor | None = None):
        """Count the T new tokens just written (per row, only its real_tokens when right-padded)."""
        self.lengths += T if real_tokens is None else real_tokens
        if not self.static:  # a static cache has no host-side state: nothing changes between steps
            self.filled = min(self.max_len, self.filled + T)

    def insert(self, rows: torch.Tensor, other: "KVCache"):
        """Replace these rows by the rows of `other` (e.g. new prompts, prefilled, in the
        places of finished rows). One host sync, to learn the new `filled`."""
        n = other.filled
        self.k[:, rows, :, :n] = other.k[:, :, :, :n]
        self.v[:, rows, :, :n] = other.v[:, :, :, :n]
        self.lengths[rows] = other.lengths
        if not self.static:
            self.filled = int(self.lengths.max())

    def select(self, rows: torch.Tensor):
        """Keep only these batch rows (e.g. drop finished ones so they stop costing compute)."""
        self.k, self.v, self.lengths = self.k[:, rows], self.v[:, rows], self.lengths[rows]
        if not self.static:
            self.filled = int(self.lengths.max()) if len(self.lengths) else 0
