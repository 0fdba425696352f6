"""Hugging Face checkpoint folders: config.json to and from our LlamaConfig, the hub download,
safetensors by one name table (with shape checks), sharding, and atomic folder replacement.

    load_model(path)              a folder (or hub id) -> model.Llama, tensors straight to device and dtype
    save_model(model, out, files) config.json + safetensors (+ the tokenizer's files), atomically
    config_from_hf / config_to_hf config.json <-> LlamaConfig (both rope layouts)

Our module names follow Hugging Face's (`embed_tokens`, `layers.N.self_attn.q_proj`, ...), so the
name table is one prefix: every tensor but the output head lives under `model.` in their files.
What we save loads in transformers unchanged; tied embeddings are saved once.

References: the safetensors format; Hugging Face's sharded checkpoint layout
(model.safetensors.index.json); gpt-fast's scripts/convert_hf_checkpoint.py and torchtune's
convert_weights.py, which keep this conversion out of the model file too.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from model import Llama, LlamaConfig

# ----------------------------------------------------------------------------- config.json


def config_from_hf(d: dict, source: str = "config.json") -> LlamaConfig:
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
    return LlamaConfig(
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


def config_from_json(path) -> LlamaConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return config_from_hf(d, source=str(path))


def config_to_hf(config: LlamaConfig) -> dict:
    """The classic config.json layout that every transformers version reads."""
    d = asdict(config)
    if config.rope_scaling is not None:
        d["rope_scaling"] = {"rope_type": "llama3", **config.rope_scaling}
    eos = config.eos_token_id
    d["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, **d}


# ----------------------------------------------------------------------------- the name table

def hf_name(name: str) -> str:
    """Our parameter name -> HF's: every tensor except the head lives under 'model.'."""
    return name if name.startswith("lm_head.") else "model." + name


def our_name(name: str) -> str:
    return name.removeprefix("model.")


# ----------------------------------------------------------------------------- load and save

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


def load_model(path, dtype=torch.float32, device="cpu") -> Llama:
    """Load a Hugging Face checkpoint folder (or hub id): config.json + model.safetensors,
    or shards listed in model.safetensors.index.json. Tensors go straight to `device`
    and `dtype`; no second full copy of the model is built."""
    folder = resolve_checkpoint(path)
    config = config_from_json(folder / "config.json")
    with torch.device("meta"):  # parameters without storage: filled by assignment below
        model = Llama(config)
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


def save_model(model: Llama, out_dir, files: dict | None = None, state: dict | None = None,
               max_shard_bytes=5 * 2**30) -> Path:
    """Write config.json + safetensors (sharded above max_shard_bytes) in HF names, plus
    `files` (name -> str or bytes: the tokenizer's, see tokenizer.Tokenizer.serving_files).
    `state`: the tensors to write, if not model.state_dict() (LoRA's merged weights).
    Atomic: written to a temporary folder, then renamed."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        config = config_to_hf(model.config)
        config["torch_dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tensors = {hf_name(n): t.detach().contiguous().cpu() for n, t in (state or model.state_dict()).items()
                   if not (model.config.tie_word_embeddings and n == "lm_head.weight")}
        write_safetensors(tmp, tensors, max_shard_bytes)
        for name, content in (files or {}).items():
            (tmp / name).write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------- safetensors files

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
