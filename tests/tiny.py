"""The test suite's tiny world, built in temporary folders (no downloads): a random Llama small
enough for a CPU test, and the model folders and data sets that conftest.py serves as the fixtures
`assets` and `model_dir`."""
import json
import random
from pathlib import Path
from types import SimpleNamespace

import torch

import checkpoint
import data
from model import Llama, LlamaConfig
from tokenizer import Tokenizer, build_tokenizer

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


# Words that make an emotion's text (emotion_row), and plain words for a tokenizer (model_folder).
EMOTION_WORDS = {"sadness": "sad lonely tears gloomy", "joy": "happy glad smile cheerful", "love": "love dear adore tender",
                 "anger": "angry mad rage furious", "fear": "afraid scared panic nervous",
                 "surprise": "shocked amazed wow sudden"}
WORDS = ["happy", "sad", "angry", "afraid", "surprised", "loved", "today", "because", "my", "friend",
         "the", "rain", "work", "music", "house", "again", "really", "so", "very", "little"]


def emotion_row(rng: random.Random, i: int) -> dict:
    label = rng.choice(data.LABELS)
    text = "i feel " + " ".join(rng.choice(EMOTION_WORDS[label].split()) for _ in range(rng.randint(1, 10)))
    reasoning = " ".join(f"The word {w} suggests {label}." for w in text.split()[2:][:rng.randint(1, 4)])
    return {"id": i, "text": text, "label": label, "reasoning": reasoning}


def write_jsonl(path: Path, rows, keys):
    path.write_text("".join(json.dumps({k: r[k] for k in keys}) + "\n" for r in rows))
    return path


def training_assets(root: Path) -> SimpleNamespace:
    """Tiny emotion data (a folder with train/validation splits), a stage-2 jsonl, reasoning-gen rows,
    and a tiny model + tokenizer per chat format (llama3 with tied embeddings, chatml untied)."""
    rng = random.Random(0)
    rows = [emotion_row(rng, i) for i in range(80)]
    emotion = root / "emotion"
    emotion.mkdir()
    write_jsonl(emotion / "train.jsonl", rows[:48], ("text", "label"))
    write_jsonl(emotion / "validation.jsonl", rows[48:60], ("text", "label"))
    augmented = write_jsonl(root / "augmented.jsonl", rows[:48], ("id", "text", "label", "reasoning"))
    rgen_rows = [{"id": i, "question": f"What is {i} plus {i}?", "answer": str(2 * i),
                  "reasoning": f"Adding {i} to itself doubles it. " * (1 + i % 3)} for i in range(12)]
    rgen = root / "rgen"
    rgen.mkdir()
    write_jsonl(rgen / "train.jsonl", rgen_rows, ("question", "answer", "reasoning"))

    texts = [r["text"] + " " + r["reasoning"] for r in rows] + [r["question"] + r["reasoning"] for r in rgen_rows]
    texts += [data.CLASSIFY_PROMPT, data.RGEN_PROMPT, "system user assistant Emotion: " + " ".join(data.LABELS)]
    models = {}
    for chat_format, tied in (("llama3", True), ("chatml", False)):
        tokenizer_dir = build_tokenizer(texts, root / f"tok-{chat_format}", chat_format=chat_format,
                                             vocab_size=400)
        tokenizer = Tokenizer(tokenizer_dir)
        model = tiny_llama(tokenizer.vocab_size, tokenizer=tokenizer, tie_word_embeddings=tied)
        models[chat_format] = checkpoint.save_model(model, root / f"model-{chat_format}",
                                                    Tokenizer(tokenizer_dir).serving_files())
    return SimpleNamespace(root=root, emotion=emotion, augmented=augmented, rgen=rgen, rows=rows,
                           rgen_rows=rgen_rows, model=models)


def model_folder(root: Path) -> Path:
    """A tiny random model folder with a byte-level BPE tokenizer in the llama3 chat format,
    wide enough that a decode step takes a few ms (a kill can land mid-run)."""
    texts = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) for i in range(200)]
    tokenizer = Tokenizer(build_tokenizer(texts, root / "tok", chat_format="llama3", vocab_size=300))
    model = tiny_llama(tokenizer.vocab_size, std=0.1, tokenizer=tokenizer, hidden_size=384, intermediate_size=1024,
                       num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2, head_dim=64).eval()
    checkpoint.save_model(model, root / "model", tokenizer.serving_files())
    return root / "model"
