"""model.py against transformers' LlamaForCausalLM on tiny random configs (fp32, eager)."""
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig as HFConfig, LlamaForCausalLM  # noqa: E402

import checkpoint  # noqa: E402
import generate  # noqa: E402
from model import Llama, rope_inv_freq  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
# head_dim 16, theta 10000, original context 64: wavelengths 6.3, 20, 63, 199, ... tokens put
# pair 0 in the high band (< 64/4), pairs 1-2 in the blended band, pairs 3-7 in the low band.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def hf_config(n_heads=4, n_kv=2, tied=True, rope=LLAMA3_ROPE, **kw):
    base = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=64 // n_heads,
                rope_theta=10000.0, rope_scaling=rope, max_position_embeddings=4096,
                tie_word_embeddings=tied, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=[2, 3],
                attn_implementation="eager")
    base.update(kw)
    return HFConfig(**base)


def make_pair(tmp_path, **kw):
    """A random HF model saved the way the hub ships it, and ours loaded from that folder."""
    torch.manual_seed(0)
    ref = LlamaForCausalLM(hf_config(**kw)).eval()
    ref.save_pretrained(tmp_path / "hf")
    ours = checkpoint.load_model(tmp_path / "hf").eval()
    return ref, ours


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2), (4, 1)])  # GQA ratios 1, 2, 4
def test_logits_match_transformers(tmp_path, tied, n_heads, n_kv):
    ref, ours = make_pair(tmp_path, n_heads=n_heads, n_kv=n_kv, tied=tied)
    ids = torch.randint(0, 101, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, **TOL)
    assert ("lm_head.weight" in dict(ours.named_parameters())) != tied  # tied: one shared tensor


def test_logits_match_without_rope_scaling(tmp_path):
    ref, ours = make_pair(tmp_path, rope=None, rope_theta=500.0)
    ids = torch.randint(0, 101, (1, 50))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, **TOL)


def test_rope_bands_and_tables_at_long_positions():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = hf_config(max_position_embeddings=200_000)
    config = checkpoint.config_from_hf(hf.to_dict())
    inv = rope_inv_freq(config)
    base = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    wavelen = 2 * math.pi / base
    assert (wavelen < 16).any() and (wavelen > 64).any() and ((wavelen >= 16) & (wavelen <= 64)).any()
    assert torch.equal(inv[wavelen < 16], base[wavelen < 16])                    # high band untouched
    torch.testing.assert_close(inv[wavelen > 64], base[wavelen > 64] / 32)        # low band / factor

    positions = torch.tensor([[0, 1, 63, 64, 1000, 8191, 65_536, 131_071, 199_999]])
    ref_cos, ref_sin = LlamaRotaryEmbedding(config=hf)(torch.zeros(1, dtype=torch.float32), positions)
    model = Llama(config).to(torch.bfloat16)  # the table must stay fp32 through .to(bf16)
    assert model.rotary.inv_freq.dtype == torch.float32
    cos, sin = model.rotary(positions)
    torch.testing.assert_close(cos, ref_cos, **TOL)
    torch.testing.assert_close(sin, ref_sin, **TOL)


def test_right_padded_batch_matches_transformers_and_single_rows(tmp_path):
    """Rows of different lengths, right-padded and run without a mask (as training runs them):
    every real token's logits equal transformers' with an attention mask, and the row's alone."""
    ref, ours = make_pair(tmp_path)
    ids = torch.randint(0, 101, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 15:] = 0
    mask[2, 7:] = 0
    real = mask.bool()
    with torch.no_grad():
        out = ours(ids)
        torch.testing.assert_close(out[real], ref(ids, attention_mask=mask).logits[real], **TOL)
        torch.testing.assert_close(out[1, :15], ours(ids[1:2, :15])[0], **TOL)
        torch.testing.assert_close(out[2, :7], ours(ids[2:3, :7])[0], **TOL)


def test_bf16_close_to_transformers_bf16(tmp_path):
    """bf16 differs from fp32 by rounding; we require our bf16 logits to be as close to the fp32
    reference as transformers' own bf16 logits are (within 1.5x), and within 0.05 of them."""
    ref, ours = make_pair(tmp_path)
    ids = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        exact = ref(ids).logits
        ref_bf16 = ref.to(torch.bfloat16)(ids).logits.float()
        ours_bf16 = ours.to(torch.bfloat16)(ids).float()
    ref_err = (ref_bf16 - exact).abs().max()
    ours_err = (ours_bf16 - exact).abs().max()
    assert ours_err <= 1.5 * ref_err + 1e-3, (ours_err, ref_err)
    assert (ours_bf16 - ref_bf16).abs().max() < 0.05


def test_our_checkpoint_loads_in_transformers(tmp_path):
    for tied in (True, False):
        torch.manual_seed(1)
        config = checkpoint.config_from_hf(hf_config(tied=tied).to_dict())
        ours = Llama(config).eval()
        checkpoint.save_model(ours, tmp_path / f"ours{tied}")
        ref = LlamaForCausalLM.from_pretrained(tmp_path / f"ours{tied}", attn_implementation="eager").eval()
        ids = torch.randint(0, 101, (2, 17))
        with torch.no_grad():
            torch.testing.assert_close(ref(ids).logits, ours(ids), **TOL)
        assert checkpoint.load_model(tmp_path / f"ours{tied}").config == config


def test_sharded_checkpoints_round_trip(tmp_path):
    ref, ours = make_pair(tmp_path)
    ref.save_pretrained(tmp_path / "hf_sharded", max_shard_size="20KB")
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.load_model(tmp_path / "hf_sharded")(ids), ref(ids).logits, **TOL)
        checkpoint.save_model(ours, tmp_path / "ours_sharded", max_shard_bytes=20_000)
        index = json.loads((tmp_path / "ours_sharded" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        back = LlamaForCausalLM.from_pretrained(tmp_path / "ours_sharded", attn_implementation="eager")
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, **TOL)


def test_save_is_atomic_and_writes_the_files_given(tmp_path):
    _, ours = make_pair(tmp_path)
    checkpoint.save_model(ours, tmp_path / "out", {"tokenizer.json": "{}", "extra.bin": b"\x00"})
    checkpoint.save_model(ours, tmp_path / "out", {"tokenizer.json": "{}", "extra.bin": b"\x00"})  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no temp folders left
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    assert (tmp_path / "out" / "extra.bin").read_bytes() == b"\x00"


def test_load_model_dtype_and_config_fields(tmp_path):
    _, _ = make_pair(tmp_path)
    model = checkpoint.load_model(tmp_path / "hf", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.config.eos_token_id == [2, 3] and model.config.rope_scaling["factor"] == 32.0


def right_padded(seqs, T):
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], mask[b, :len(s)] = s, 1
    return ids, mask


@pytest.mark.parametrize("static", [False, True], ids=["filled-slots", "static"])
@pytest.mark.parametrize("lengths", [[10], [10, 5, 8]], ids=["one", "right-padded"])
def test_kv_cache_prefill_and_decode_equal_full_forward(tmp_path, lengths, static):
    """Prompts of different lengths prefilled together, then one token per row per step: every
    row's logits equal a forward over that row alone, whether attention reads the filled slots
    or the whole static cache."""
    _, ours = make_pair(tmp_path)
    B, T, steps = len(lengths), max(lengths), 6
    seqs = [torch.randint(0, 101, (n + steps,)) for n in lengths]
    ids, mask = right_padded([s[:n] for s, n in zip(seqs, lengths)], T)
    with torch.no_grad():
        alone = [ours(s[None])[0] for s in seqs]
        cache = ours.new_cache(B, T + steps, static=static)
        prefill = ours(ids, cache=cache)
        cache.advance(T, mask.sum(1))                    # the caller counts what it wrote
        last, _ = generate.prefill(ours, [s[:n].tolist() for s, n in zip(seqs, lengths)])
        for b, n in enumerate(lengths):
            torch.testing.assert_close(prefill[b, :n], alone[b][:n], **TOL)
            torch.testing.assert_close(last[b], alone[b][n - 1], **TOL)  # each row's last real token
        for t in range(steps):
            step = ours(torch.stack([s[n + t] for s, n in zip(seqs, lengths)])[:, None], cache=cache)
            cache.advance(1)
            for b, n in enumerate(lengths):
                torch.testing.assert_close(step[b, 0], alone[b][n + t], **TOL)
    assert cache.lengths.tolist() == [n + steps for n in lengths]


def test_kv_cache_select_and_insert_keep_rows(tmp_path):
    """Dropping rows, and putting a newly prefilled prompt in a row's place, leave every other
    row's logits as they were: what continuous batching relies on."""
    _, ours = make_pair(tmp_path)
    ids = torch.randint(0, 101, (3, 8))
    newcomer = torch.randint(0, 101, (1, 7))
    with torch.no_grad():
        full, new_full = ours(ids), ours(newcomer)[0]
        cache = ours.new_cache(3, 8)
        ours(ids[:, :5], cache=cache)
        assert cache.lengths.tolist() == [0, 0, 0]      # the forward pass writes keys, never counts
        cache.advance(5)
        cache.select(torch.tensor([0, 2]))
        step = ours(ids[[0, 2], 5:6], cache=cache)
        cache.advance(1)
        torch.testing.assert_close(step[:, 0], full[[0, 2], 5], **TOL)
        small = ours.new_cache(1, 5)
        ours(newcomer[:, :5], cache=small)
        small.advance(5)
        cache.insert(torch.tensor([0]), small)          # the newcomer takes row 0's place
        assert cache.lengths.tolist() == [5, 6] and cache.filled == 6
        for t in range(2):
            step = ours(torch.stack([newcomer[0, 5 + t], ids[2, 6 + t]])[:, None], cache=cache)
            cache.advance(1)
            torch.testing.assert_close(step[0, 0], new_full[5 + t], **TOL)
            torch.testing.assert_close(step[1, 0], full[2, 6 + t], **TOL)


def test_gradient_checkpointing_gives_same_gradients(tmp_path):
    _, ours = make_pair(tmp_path)
    ours.train()
    ids = torch.randint(0, 101, (2, 16))
    grads = []
    for flag in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = flag
        ours(ids).float().logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in ours.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- bad input

def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoint.load_model(tmp_path / "empty")


def test_not_a_folder_nor_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        checkpoint.load_model(tmp_path / "nope")


def test_unknown_rope_type_and_missing_field(tmp_path):
    d = hf_config().to_dict()
    d.pop("rope_parameters", None)
    d["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        checkpoint.config_from_hf(d)
    d = hf_config().to_dict()
    del d["hidden_size"]
    with pytest.raises(ValueError, match="missing field 'hidden_size'"):
        checkpoint.config_from_hf(d)


def _rewrite_weights(folder, edit):
    from safetensors.torch import load_file, save_file
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def test_missing_tensor(tmp_path):
    make_pair(tmp_path)
    _rewrite_weights(tmp_path / "hf", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        checkpoint.load_model(tmp_path / "hf")


def test_wrong_shape_and_unexpected_tensor(tmp_path):
    make_pair(tmp_path)
    _rewrite_weights(tmp_path / "hf", lambda s: s.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(65,\)"):
        checkpoint.load_model(tmp_path / "hf")
    _rewrite_weights(tmp_path / "hf", lambda s: s.update({"model.norm.weight": torch.ones(64),
                                                          "model.extra": torch.ones(1)}))
    with pytest.raises(ValueError, match="unexpected tensor 'model.extra'"):
        checkpoint.load_model(tmp_path / "hf")


def test_truncated_safetensors(tmp_path):
    make_pair(tmp_path)
    file = tmp_path / "hf" / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors: unreadable safetensors file"):
        checkpoint.load_model(tmp_path / "hf")


def test_hub_id_offline_is_one_clear_line(tmp_path):
    import os
    import subprocess
    import sys
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    code = "import checkpoint; checkpoint.load_model('meta-llama/Llama-3.2-1B-Instruct')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0
    assert last.startswith("RuntimeError: meta-llama/Llama-3.2-1B-Instruct: not a local folder")
    assert "hub" in last and "\n" not in last


@pytest.mark.parametrize("command", [
    ["generate.py", "--model", "meta-llama/Llama-3.2-1B-Instruct", "--prompt", "hi"],
    ["eval.py", "--model", "meta-llama/Llama-3.2-1B-Instruct", "--task", "q2a", "--data", "dair-ai/emotion",
     "--split", "test", "--out", "unused"],
    ["train.py", "--task", "q2a", "--model", "meta-llama/Llama-3.2-1B-Instruct", "--data", "dair-ai/emotion",
     "--out", "unused"]], ids=lambda c: c[0])
def test_cli_offline_hub_id_is_one_line(tmp_path, command):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run([sys.executable, os.path.join(root, command[0]), *command[1:]], capture_output=True,
                            text=True, env=env, cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(command[0] + ": ") and "Hugging Face hub" in line, line
