"""The test suite's tiny world, built in temporary folders (no downloads): a random Llama small
enough for a CPU test, the model folders and data sets that conftest.py serves as the fixtures
`assets` and `model_dir`, small labelled sets in a user's layouts, and random token batches."""
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

# A config.json of TINY's shape with Llama 3.2's RoPE scaling, for scripts that read one (bench.py --config).
CONFIG_JSON = {**TINY, "vocab_size": 512, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
               "rope_theta": 500000.0, "tie_word_embeddings": True,
               "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}


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


def emotion_file(folder: Path, n: int) -> Path:
    """n rows of plain words in folder/train.jsonl, labelled by the emotion's id (0-5), not its name."""
    rows = [{"text": " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(3 + i % 7)),
             "label": i % 6} for i in range(n)]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
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


# ----------------------------------------------------------------------------- a user's own labelled sets

# A hub README's header as the hub writes it (dair-ai/emotion's layout: configs, features, splits).
HUB_README = """---
language:
- en
dataset_info:
- config_name: split
  features:
  - name: text
    dtype: string
  - name: label
    dtype:
      class_label:
        names:
          '0': {0}
          '1': {1}
  splits:
  - name: train
    num_examples: 6
---

# A card
"""

BINARY = [("the refund never arrived", 0), ("great service, thanks", 1), ("still waiting, no answer", 0),
          ("quick and friendly", 1), ("never again", 0), ("lovely people", 1)]
NEWS = [("stocks fell on monday", "Business"), ("the team won the cup", "Sports"),
        ("a new chip doubles speed", "Sci/Tech"), ("leaders met in geneva", "World news"),
        ("profits rose sharply", "Business"), ("a record at the olympics", "Sports")]


def write_binary_hub(folder: Path, names=("negative", "positive")) -> Path:
    """Ids 0/1 in data/{split}.csv, their names only in README.md's ClassLabel metadata."""
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text(HUB_README.format(*names))
    for split in ("train", "test"):
        (folder / "data" / f"{split}.csv").write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in BINARY))
    return folder


def write_news_csv(folder: Path, rows=NEWS, test_rows=NEWS[:4]) -> Path:
    """Multi-word labels as strings, in columns named body and category."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows), ("test", test_rows)):
        (folder / f"{split}.csv").write_text("category,body,source\n" + "".join(f'{y},"{t}",wire\n' for t, y in part))
    return folder


# ----------------------------------------------------------------------------- random tokens

def prompts_of(lengths, vocab=97, seed=1) -> list[list[int]]:
    """Random prompts of these lengths."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def batches(n: int, seed: int = 0, vocab: int = 50) -> list[data.Batch]:
    """n random micro-batches of 3 examples, the second half of each example a target."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        examples = []
        for length in torch.randint(6, 12, (3,), generator=gen).tolist():
            ids = torch.randint(1, vocab, (length,), generator=gen, dtype=torch.int32)
            examples.append(data.Example(ids, torch.arange(length) >= length // 2))
        out.append(data.collate(examples, pad_id=0))
    return out
