"""lora.py on tiny random models: the merged weights give the adapted model's logits, one AdamW
step on the adapters equals a hand-computed one, and what we save loads in transformers (the
merged folder) and in PEFT (the adapter alone) with the same logits."""
import json

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import lora
import optim
from tiny import tiny_llama

VOCAB = 64
IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def adapted(rank=4, alpha=8.0, targets=lora.TARGETS, seed=0):
    """A tiny model with adapters whose B is random too, so that they change the output."""
    model = tiny_llama(VOCAB, seed=seed, tie_word_embeddings=True)
    names = lora.add_adapters(model, rank, alpha, targets)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for layer in lora.adapters(model).values():
            layer.lora_B.normal_(0.0, 0.05)
    return model, names


def test_adapters_replace_the_targeted_layers_and_freeze_the_rest():
    model, names = adapted(targets=("q_proj", "down_proj"))
    assert names == [f"layers.{i}.{part}" for i in range(2) for part in ("self_attn.q_proj", "mlp.down_proj")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in names for x in "AB"}
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="lm_head is not a linear layer of a block"):
        lora.add_adapters(tiny_llama(VOCAB), 4, 8.0, ("lm_head",))


def test_a_fresh_adapter_changes_nothing():
    plain = tiny_llama(VOCAB, tie_word_embeddings=True)
    model = tiny_llama(VOCAB, tie_word_embeddings=True)
    lora.add_adapters(model, 4, 8.0)
    torch.testing.assert_close(model(IDS), plain(IDS), rtol=0, atol=0)


def test_merged_weights_give_the_adapted_models_logits():
    model, _ = adapted()
    merged = tiny_llama(VOCAB, tie_word_embeddings=True)
    merged.load_state_dict(lora.merged_state(model))
    assert not torch.allclose(merged(IDS), tiny_llama(VOCAB, tie_word_embeddings=True)(IDS), atol=1e-3)
    torch.testing.assert_close(merged(IDS), model(IDS), atol=1e-5, rtol=1e-5)


def test_one_step_equals_the_hand_computed_update():
    """With y = W x + s B A x, dL/dB = s (dL/dW) A^T and dL/dA = s B^T (dL/dW), where dL/dW is the
    plain model's gradient. B starts at 0: A gets no gradient, and AdamW's first step moves B
    by lr * g / (|g| + eps) (bias correction makes m = g and v = g^2), weight decay aside."""
    rank, alpha, lr, wd = 3, 6.0, 1e-2, 0.1
    plain = tiny_llama(VOCAB, seed=3)
    F.cross_entropy(plain(IDS).flatten(0, 1), IDS.roll(-1, 1).flatten()).backward()
    model = tiny_llama(VOCAB, seed=3)
    lora.add_adapters(model, rank, alpha)
    A0 = {n: layer.lora_A.detach().clone() for n, layer in lora.adapters(model).items()}
    optimizer = optim.build_optimizer(model, lr, wd, False, torch.device("cpu"))
    F.cross_entropy(model(IDS).flatten(0, 1), IDS.roll(-1, 1).flatten()).backward()
    optimizer.step()
    scale = alpha / rank
    for name, layer in lora.adapters(model).items():
        grad_W = plain.get_submodule(name).weight.grad
        g_B = scale * grad_W @ A0[name].T
        torch.testing.assert_close(layer.lora_B.detach(), -lr * g_B / (g_B.abs() + 1e-8), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(layer.lora_A.detach(), A0[name] * (1 - lr * wd))


def test_adapter_state_round_trips_and_refuses_another_shape():
    model, _ = adapted()
    other, _ = adapted(seed=5)
    lora.load_adapter_state(other, lora.adapter_state(model))
    torch.testing.assert_close(other.layers[1].mlp.up_proj.lora_B, model.layers[1].mlp.up_proj.lora_B)
    smaller, _ = adapted(targets=("q_proj",))
    with pytest.raises(ValueError, match="--lora-rank or --lora-targets"):
        lora.load_adapter_state(smaller, lora.adapter_state(model))


def test_saved_folders_load_in_transformers_and_peft(tmp_path):
    """best/ (merged) in LlamaForCausalLM, and the adapter in PeftModel over the saved base: both give
    our adapted model's logits."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = tiny_llama(VOCAB, tie_word_embeddings=True)
    checkpoint.save_model(base, tmp_path / "base")
    model, _ = adapted(targets=("q_proj", "v_proj", "gate_proj"))
    checkpoint.save_model(model, tmp_path / "best", state=lora.merged_state(model))
    lora.save_peft(model, tmp_path / "best-adapter", str(tmp_path / "base"))
    config = json.loads((tmp_path / "best-adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["target_modules"] == ["gate_proj", "q_proj", "v_proj"]
    ours = model(IDS)
    with torch.no_grad():
        merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "best").eval()
        torch.testing.assert_close(merged(IDS).logits, ours, atol=1e-5, rtol=1e-5)
        hf_base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
        with_adapter = peft.PeftModel.from_pretrained(hf_base, tmp_path / "best-adapter").eval()
        torch.testing.assert_close(with_adapter(input_ids=IDS).logits, ours, atol=1e-5, rtol=1e-5)
