"""Llama 3.2, written out plainly, with Hugging Face checkpoint loading and saving.

Read this file top to bottom: config, the three building blocks (RMSNorm, rotary
position embedding, attention + MLP), the decoder block, the model, the static
KV cache, and finally the checkpoint I/O.

The same code runs every Llama-architecture checkpoint on the hub that uses
SwiGLU, RMSNorm and (optionally) llama3 RoPE scaling: Llama 3.2 1B/3B, SmolLM2,
TinyLlama. Module names follow Hugging Face's (`embed_tokens`, `layers.N.self_attn.q_proj`,
...), so HF checkpoints load by name with one prefix added, and what we save loads in
transformers unchanged.

References: Meta's llama3 repo (model.py), Hugging Face `modeling_llama.py`,
Su et al. 2021 (RoPE), Ainslie et al. 2023 (grouped-query attention),
Shazeer 2020 (SwiGLU), Zhang & Sennrich 2019 (RMSNorm).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------- config

@dataclass
class LlamaConfig:
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

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "LlamaConfig":
        """Build from a Hugging Face config.json dict; anything we do not implement is an error."""
        def need(key):
            if key not in d:
                raise ValueError(f"{source}: missing field '{key}'")
            return d[key]

        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"{source}: model_type '{d['model_type']}' is not a Llama checkpoint")
        for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if d.get(key, ok) != ok:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported (expected {ok!r})")

        # transformers >= 5 writes rope_parameters (with rope_theta inside); older files write
        # rope_theta and rope_scaling at the top level. Accept both.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type == "default":
            rope_scaling = None
        elif rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            for key in keys:
                if key not in rope:
                    raise ValueError(f"{source}: rope_scaling of type llama3 is missing '{key}'")
            rope_scaling = {key: rope[key] for key in keys}
        else:
            raise ValueError(f"{source}: rope_scaling type '{rope_type}' is not supported (only llama3 or none)")

        n_heads = need("num_attention_heads")
        eos = d.get("eos_token_id")
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=n_heads,
            num_key_value_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or need("hidden_size") // n_heads,
            rms_norm_eps=need("rms_norm_eps"),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
        )

    @classmethod
    def from_json(cls, path) -> "LlamaConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(d, source=str(path))

    def to_hf(self) -> dict:
        """The classic config.json layout that every transformers version reads."""
        d = asdict(self)
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "llama3", **self.rope_scaling}
        eos = self.eos_token_id
        d["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                "attention_bias": False, "mlp_bias": False, **d}


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

    def __init__(self, config: LlamaConfig):
        super().__init__()
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

    def forward(self, x, cos, sin, mask, kv_cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            # Write this step's keys/values into each row's own slots (slot = position), then
            # attend over the first n_keys slots; the mask hides what a row has not filled.
            cache_k, cache_v, slots, n_keys = kv_cache                                 # slots: (B, T)
            rows = torch.arange(B, device=x.device)[:, None]
            cache_k[rows, :, slots] = k.transpose(1, 2)                                # (B, T, nkv, hd)
            cache_v[rows, :, slots] = v.transpose(1, 2)
            k, v = cache_k[:, :, :n_keys], cache_v[:, :, :n_keys]                      # (B, nkv, S, hd)
        if mask is None:  # no padding, nothing cached before these tokens: plain causal attention (fast kernels)
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

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- positions and masks

def padded_positions_and_mask(real):
    """Positions (B, T) and attention mask (B, 1, T, T) of a batch without a cache whose real
    tokens are marked by `real` (B, T), with padding on either side; the mask is None where
    plain causal attention is exact (no padding)."""
    positions = (real.long().cumsum(1) - 1).clamp(min=0)                  # left padding: -1 -> 0
    if bool(real.all()):
        return positions, None
    T = real.shape[1]
    slot = torch.arange(T, device=real.device)
    causal = slot[None, :] <= slot[:, None]                                # (T, T)
    # Each token also sees itself, so a padding row never has zero visible keys
    # (that would give NaN); what padding rows compute is never used.
    mask = (causal & real[:, None, :]) | torch.eye(T, dtype=torch.bool, device=real.device)
    return positions, mask[:, None]


def cached_positions_and_mask(cache: "KVCache", T: int):
    """Positions (B, T) of T new tokens after each row's cached ones, the mask (B, 1, T, S)
    over the first S = n_keys cache slots (None where plain causal attention is exact), and
    n_keys. Slot = position, so a token sees exactly the slots up to its own position."""
    positions = cache.lengths[:, None] + torch.arange(T, device=cache.lengths.device)   # (B, T)
    if cache.static:  # one shape for every step (torch.compile, CUDA graphs): all slots, masked
        n_keys = cache.max_len
    else:             # only the slots some row has filled
        n_keys = min(cache.max_len, cache.filled + T)
        if cache.filled == 0:  # an empty cache: plain causal attention over the new tokens
            return positions, None, n_keys
    slot = torch.arange(n_keys, device=positions.device)
    return positions, (slot <= positions[:, :, None])[:, None], n_keys


def last_real(h, attention_mask):
    """h (B, T, d) -> (B, 1, d) at each row's last real token, for padding on either side."""
    T = attention_mask.shape[1]
    last = (attention_mask.long() * torch.arange(1, T + 1, device=h.device)).argmax(1)   # (B,)
    return h[torch.arange(h.shape[0], device=h.device), last][:, None]


# ----------------------------------------------------------------------------- the model

class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
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

    def forward(self, input_ids, attention_mask=None, cache: "KVCache | None" = None, last_only=False):
        """input_ids (B, T) -> logits (B, T, vocab), or with last_only (B, 1, vocab): the logits
        of each row's last real token."""
        h = self.hidden_states(input_ids, attention_mask, cache)
        if last_only:
            h = h[:, -1:] if attention_mask is None else last_real(h, attention_mask)
        return self.lm_head(h)                                           # (B, T, vocab)

    def hidden_states(self, input_ids, attention_mask=None, cache: "KVCache | None" = None):
        """input_ids (B, T) -> final normalised hidden states (B, T, d), before the output head.
        Training uses this to project only the positions that carry a loss onto the vocabulary.

        attention_mask (B, T): 1 for real tokens, 0 for padding. Without a cache, padding may be
        on the left or the right: positions count real tokens only (cumsum(mask) - 1), so a
        padded row gets the positions it would get alone. Right-padded batches may pass no mask:
        padding then follows every real token, plain causal attention is exact for the real
        tokens, and fast kernels run. With a cache, the tokens continue each row where it
        stopped, and padding must be on the right (the row's next tokens overwrite its slots).
        """
        B, T = input_ids.shape
        kv = [None] * len(self.layers)
        if cache is not None:
            positions, mask, n_keys = cached_positions_and_mask(cache, T)
            slots = positions.clamp(max=cache.max_len - 1)  # clamps only rows past their end, never read
            kv = [(cache.k[i], cache.v[i], slots, n_keys) for i in range(len(self.layers))]
        elif attention_mask is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
            mask = None
        else:
            positions, mask = padded_positions_and_mask(attention_mask.bool())
        cos, sin = self.rotary(positions)

        x = self.embed_tokens(input_ids)                                # (B, T, d)
        for layer, layer_kv in zip(self.layers, kv):
            if self.gradient_checkpointing and self.training:
                # Recompute the block in the backward pass instead of storing its activations.
                x = checkpoint(layer, x, cos, sin, mask, layer_kv, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, layer_kv)
        if cache is not None:
            cache.advance(T, attention_mask)
        return self.norm(x)

    def new_cache(self, batch_size: int, max_len: int, static: bool = False) -> "KVCache":
        p = self.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, p.dtype, p.device, static)

    # ------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Llama":
        """Load a Hugging Face checkpoint folder (or hub id): config.json + model.safetensors,
        or shards listed in model.safetensors.index.json. Tensors go straight to `device`
        and `dtype`; no second full copy of the model is built."""
        folder = resolve_checkpoint(path)
        config = LlamaConfig.from_json(folder / "config.json")
        with torch.device("meta"):  # parameters without storage: filled by assignment below
            model = cls(config)
        expected = {hf_name(name): p.shape for name, p in model.state_dict().items()
                    if not (config.tie_word_embeddings and name == "lm_head.weight")}
        state = {}
        for file, names in checkpoint_files(folder).items():
            for name, tensor in read_safetensors(file, names, device):
                if name not in expected:
                    if name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight":
                        continue  # recomputed / tied copy some exporters include
                    raise ValueError(f"{file}: unexpected tensor '{name}'")
                if tensor.shape != expected[name]:
                    raise ValueError(f"{file}: tensor '{name}' has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(expected[name])}")
                state[our_name(name)] = tensor.to(dtype)
        missing = sorted(set(expected) - {hf_name(n) for n in state})
        if missing:
            raise ValueError(f"{folder}: missing tensor '{missing[0]}'"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight  # assign replaced the tied parameter
        return model.to(device)  # moves the fp32 rope table; the weights are already there

    def save_pretrained(self, out_dir, files: dict | None = None, max_shard_bytes=5 * 2**30):
        """Write config.json + safetensors (sharded above max_shard_bytes) in HF names, plus
        `files` (name -> str or bytes: the tokenizer's, see data.Tokenizer.serving_files).
        Atomic: written to a temporary folder, then renamed."""
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            config = self.config.to_hf()
            config["torch_dtype"] = str(self.embed_tokens.weight.dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            state = {hf_name(n): t.detach().contiguous().cpu() for n, t in self.state_dict().items()
                     if not (self.config.tie_word_embeddings and n == "lm_head.weight")}
            write_safetensors(tmp, state, max_shard_bytes)
            for name, content in (files or {}).items():
                (tmp / name).write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
            replace_dir(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out_dir


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

    def advance(self, T: int, attention_mask=None):
        """Count T new tokens per row (only the real ones, when right-padded)."""
        self.lengths += T if attention_mask is None else attention_mask.sum(1)
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


# ----------------------------------------------------------------------------- checkpoint files

def hf_name(name: str) -> str:
    """Our parameter name -> HF's: every tensor except the head lives under 'model.'."""
    return name if name.startswith("lm_head.") else "model." + name


def our_name(name: str) -> str:
    return name.removeprefix("model.")


def resolve_checkpoint(path) -> Path:
    """A local folder as it is; otherwise a hub id such as meta-llama/Llama-3.2-1B-Instruct,
    downloaded once into the Hugging Face cache."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists() or str(path).count("/") != 1 or str(path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # offline, gated (needs `hf auth login`), or no such repo
        raise RuntimeError(f"{path}: not a local folder and could not be downloaded from the "
                           f"Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def checkpoint_files(folder: Path) -> dict[Path, list[str] | None]:
    """Map each safetensors file of a checkpoint to the tensor names it should hold (None: all)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        files: dict[Path, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(folder / file, []).append(name)
        return files
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    return {single: None}


def read_safetensors(file: Path, names, device):
    """Yield (name, tensor) from one safetensors file, loaded directly onto `device`."""
    from safetensors import safe_open
    if not file.is_file():
        raise FileNotFoundError(f"{file}: listed in the index but missing")
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in names if names is not None else f.keys():
                if name not in f.keys():
                    raise ValueError(f"{file}: the index lists '{name}' but the file does not hold it")
                yield name, f.get_tensor(name)
    except ValueError:
        raise
    except Exception as e:  # SafetensorsError: truncated or corrupt header/data
        raise ValueError(f"{file}: unreadable safetensors file ({e})") from None


def write_safetensors(folder: Path, state: dict, max_shard_bytes: int):
    from safetensors.torch import save_file
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def replace_dir(new: Path, target: Path):
    """Put folder `new` at `target`; an existing target is swapped out, then removed."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old)
    else:
        os.replace(new, target)
