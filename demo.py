"""The embedded demo: the whole method on a CPU in minutes, with nothing downloaded.

    python pipeline.py --demo

prepare() writes generated stand-ins for dair-ai/emotion and syvai/reasoning-gen in the hub's
own file layouts, trains a small tokenizer on them, builds a tiny random Llama from
demo/tiny_llama.json, and returns the pipeline settings that point at them: the four stages
then run the same code as the real pipeline.
"""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import torch

import checkpoint
import data
import readers
from files import write_atomic
from model import Llama
from tokenizer import Tokenizer, build_tokenizer

DEMO_MODEL_CONFIG = Path(__file__).with_name("demo") / "tiny_llama.json"


# ----------------------------------------------------------------------------- generated data

# Words that carry each emotion in the generated demo sentences.
DEMO_WORDS = {
    "sadness": ["lonely", "hopeless", "miserable", "gloomy", "heartbroken", "empty"],
    "joy": ["happy", "cheerful", "delighted", "glad", "thrilled", "content"],
    "love": ["loving", "tender", "affectionate", "caring", "adoring", "romantic"],
    "anger": ["angry", "furious", "irritated", "annoyed", "outraged", "resentful"],
    "fear": ["scared", "afraid", "nervous", "terrified", "anxious", "frightened"],
    "surprise": ["amazed", "astonished", "shocked", "stunned", "startled", "speechless"],
}
DEMO_TEMPLATES = ["i feel {w} {tail}", "i am feeling so {w} {tail}", "honestly i felt {w} when {event}",
                  "i have been {w} since {event}", "i feel a bit {w} {tail}"]
DEMO_TAILS = ["today", "right now", "about my new job", "after the call", "this morning", "about the weekend"]
DEMO_LABEL_NOISE = 0.1  # share of rows whose label is redrawn at random, like annotators' disagreements
DEMO_EVENTS = ["my friend called", "the results came in", "i got home", "we talked", "the letter arrived"]


def demo_sentence(rng: random.Random, label: str) -> tuple[str, str]:
    word = rng.choice(DEMO_WORDS[label])
    text = rng.choice(DEMO_TEMPLATES).format(w=word, tail=rng.choice(DEMO_TAILS), event=rng.choice(DEMO_EVENTS))
    return text, word


def demo_reasoning(text: str, word: str, label: str) -> str:
    return f"The writer says they feel {word}. Feeling {word} is a sign of {label}."


def write_demo_data(folder: Path, n_train: int, seed: int = 0) -> tuple[Path, Path]:
    """Generated stand-ins for dair-ai/emotion (its older data/{split}.jsonl.gz layout) and for
    syvai/reasoning-gen (question, answer, reasoning), written where the real loaders read them."""
    rng = random.Random(seed)
    labels = list(data.LABELS)
    emotion = folder / "emotion"
    (emotion / "data").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", max(n_train // 8, 30)), ("test", max(n_train // 4, 60))):
        rows = []
        for _ in range(n):
            label = rng.choice(labels)
            text = demo_sentence(rng, label)[0]
            if rng.random() < DEMO_LABEL_NOISE:
                label = rng.choice(labels)
            rows.append({"text": text, "label": labels.index(label)})
        jsonl = "".join(json.dumps(r) + "\n" for r in rows)
        write_atomic(emotion / "data" / f"{split}.jsonl.gz", gzip.compress(jsonl.encode("utf-8")))
    rgen_rows = []
    for _ in range(n_train):
        label = rng.choice(labels)
        text, word = demo_sentence(rng, label)
        row = data.emotion_as_rgen({"id": 0, "text": text, "label": label})
        rgen_rows.append({"question": row["question"], "answer": row["answer"],
                          "reasoning": demo_reasoning(text, word, label)})
    rgen = folder / "reasoning-gen"
    write_reasoning_gen_demo(rgen, rgen_rows)
    return emotion, rgen


def prepare(out: Path, rows: int, epochs: float, seed: int) -> dict:
    """Write the demo's data, tokenizer and tiny random model under OUT/demo_assets (once), and
    return the pipeline settings that point at them. Everything after this runs the real code
    paths, at a size a CPU trains in a minute."""
    assets = out / "demo_assets"
    emotion, rgen = assets / "data" / "emotion", assets / "data" / "reasoning-gen"
    base = assets / "tiny-llama"
    if not (base / "config.json").is_file():
        emotion, rgen = write_demo_data(assets / "data", rows, seed)
        texts = [r["text"] for r in readers.read_emotion(emotion, "train")]
        texts += [m["content"] for r in readers.iter_reasoning_gen(rgen)
                  for m in data.example_messages("rgen", r)]
        tokenizer_dir = build_tokenizer(texts, assets / "tokenizer", chat_format="llama3", vocab_size=600)
        config = checkpoint.config_from_json(DEMO_MODEL_CONFIG)
        torch.manual_seed(seed)
        checkpoint.save_model(Llama(config), base, Tokenizer(tokenizer_dir).serving_files())
    return dict(base_model=str(base), rgen_data=str(rgen), emotion_data=str(emotion), device="cpu",
                dtype="fp32", lr=5e-4, rgen_examples=rows, rgen_epochs=epochs, cls_epochs=epochs,
                rgen_max_seq_len=256, cls_max_seq_len=256, batch_size=16, grad_accum=1,
                augment_max_new_tokens=40, gen_batch_size=64)


def write_reasoning_gen_demo(folder, rows: list[dict], shards: int = 2) -> Path:
    """Write rows {question, answer, reasoning} in reasoning-gen's layout,
    folder/data/train-0000i-of-0000N.parquet (or folder/data/train.jsonl without pyarrow)."""
    data = Path(folder) / "data"
    data.mkdir(parents=True, exist_ok=True)
    columns = ["question", "answer", "reasoning"]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pyarrow is optional: the demo then runs on jsonl
        write_atomic(data / "train.jsonl", "".join(json.dumps({c: r[c] for c in columns}) + "\n" for r in rows))
        return Path(folder)
    shards = max(1, min(shards, len(rows)))
    per_shard = -(-len(rows) // shards)
    for i in range(shards):
        part = rows[i * per_shard:(i + 1) * per_shard]
        table = pa.table({c: [r[c] for r in part] for c in columns})
        write_atomic(data / f"train-{i:05d}-of-{shards:05d}.parquet", lambda tmp: pq.write_table(table, tmp))
    return Path(folder)
