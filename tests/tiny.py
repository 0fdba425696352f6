"""The one tiny-model factory of the test suite: a random Llama small enough for a CPU test."""
import torch

from model import Llama, LlamaConfig

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512)


def tiny_llama(vocab_size: int, seed: int = 0, std: float | None = None, tokenizer=None, **overrides) -> Llama:
    """A random Llama of TINY's shape (any field overridden), seeded. std: redraw every matrix
    but the embedding with this std (large values make logits peaked, so argmax has no
    near-ties). tokenizer: take bos and eos ids from it."""
    if tokenizer is not None:
        overrides = {"bos_token_id": tokenizer.bos_id, "eos_token_id": sorted(tokenizer.stop_ids), **overrides}
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(vocab_size=vocab_size, **{**TINY, **overrides}))
    if std is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.normal_(0.0, std)
    return model
