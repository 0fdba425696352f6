"""The embedded demo: the whole method on a CPU in minutes, with nothing downloaded.

    python pipeline.py --demo

prepare() writes generated stand-ins for dair-ai/emotion and syvai/reasoning-gen in the hub's
own file layouts, trains a small tokenizer on them and builds a tiny random Llama from
demo/tiny_llama.json; settings() are the pipeline settings that point at them. The four stages
then run the same code as the real pipeline. The data come from a small world built so that
the method can matter (see EXPLANATION): reasoning carries facts the labels teach only slowly.
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
from tokenizer import CHAT_TOKENS, Tokenizer, build_tokenizer

DEMO_MODEL_CONFIG = Path(__file__).with_name("demo") / "tiny_llama.json"


# ----------------------------------------------------------------------------- generated data

# The demo's world. The writer knows some people, each as a partner, a friend or a rival, and
# hears news about them: good news, bad news, or something merely unexpected. How the writer feels
# follows from both facts at once (WORLD_FEELINGS), so a classifier that sees only sentences and
# labels must discover every person's relation through the labels. The stage-1 corpus is a
# different task over the same world (is the news good or bad for the writer?) whose reasoning
# states the two facts; the generator learns them there and writes them for every emotion row.
WORLD_PEOPLE = 80  # how many people the writer knows: a few sentences each, so labels alone teach slowly
WORLD_RELATIONS = ["partner", "friend", "rival"]
WORLD_EVENTS = {
    "good news": ["won the race", "got the job", "passed the exam", "found a new home",
                  "got a promotion", "won the lottery"],
    "bad news": ["lost the race", "failed the exam", "got sick", "lost the job",
                 "broke a leg", "missed the flight"],
    "a surprise": ["showed up at my door", "called out of nowhere", "dyed their hair blue",
                   "moved to another country"],
}
WORLD_FEELINGS = {("good news", "partner"): "love", ("good news", "friend"): "joy",
                  ("good news", "rival"): "anger", ("bad news", "partner"): "fear",
                  ("bad news", "friend"): "sadness", ("bad news", "rival"): "joy"}
WORLD_OPENERS = ["i just heard that", "guess what,", "so apparently", "today i found out that", "news:"]
WORLD_TAILS = ["", " this morning", " yesterday", " last week", " again"]
WORLD_SURPRISES = 0.6   # share of sentences about something merely unexpected
RGEN_ROWS_PER_ROW = 2    # stage-1 rows per emotion training row: the generator meets everyone often
DEMO_LABEL_NOISE = 0.1  # share of rows whose label is redrawn at random, like annotators' disagreements

# What summary.md says about the demo's figures.
EXPLANATION = (
    "**DEMO: a synthetic world** (demo.py), a tiny random model and a few minutes of CPU. The writer "
    f"knows {WORLD_PEOPLE} people, each a partner, a friend or a rival, and how they feel about news "
    "depends on both: a rival's good news brings anger, a partner's bad news fear, a friend's bad news "
    "sadness. The emotion labels teach who is who only indirectly, and only through the few sentences "
    "about good or bad news. The stage-1 corpus, a different task about the same people, states it "
    "outright; the generator learns it there and writes it into every training row "
    "(\"a rival got good news.\"). So q2ra learns the facts from those reasons and the emotion from the "
    "facts, while q2a must find both in the labels alone. The paper's figures (right-hand column) come "
    "from the real pipeline on dair-ai/emotion, not from this world.")

# The stage-1 corpus asks two other questions about the same sentences: what the news is to the
# writer (it depends on both facts) and whom it is about.
VERDICT_QUESTION = ("Is this news good or bad for the writer, or just unexpected? "
                    "Answer good, bad or unexpected.\n\nText: {text}")
VERDICTS = {("good news", "rival"): "bad", ("bad news", "rival"): "good", ("good news", "partner"): "good",
            ("good news", "friend"): "good", ("bad news", "partner"): "bad", ("bad news", "friend"): "bad"}
WHO_QUESTION = "Who is this news about? Answer with their name.\n\nText: {text}"


def world_people(seed: int) -> dict[str, dict]:
    """Who is what to the writer, and which news the writer hears first of them: the world's
    hidden facts, fixed by the seed. Names are two made-up syllables, so a name's letters say
    nothing about the person."""
    rng = random.Random(f"world-{seed}")
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    names = sorted({rng.choice(syllables) + rng.choice(syllables) for _ in range(10 * WORLD_PEOPLE)})
    return {name: dict(relation=rng.choice(WORLD_RELATIONS), first=rng.choice(["good news", "bad news"]))
            for name in rng.sample(names, WORLD_PEOPLE)}


def world_sentence(rng: random.Random, people: dict[str, dict]) -> tuple[str, dict]:
    """A sentence about one person and one event, and the facts behind it. Good and bad news are
    equally likely for everyone (which of the two the coin calls heads is the person's `first`)."""
    name = rng.choice(sorted(people))
    person = people[name]
    if rng.random() < WORLD_SURPRISES:
        kind = "a surprise"
    elif rng.random() < 0.5:
        kind = person["first"]
    else:
        kind = "bad news" if person["first"] == "good news" else "good news"
    event = rng.choice(WORLD_EVENTS[kind])
    text = f"{rng.choice(WORLD_OPENERS)} {name} {event}{rng.choice(WORLD_TAILS)}"
    return text, dict(name=name, relation=person["relation"], kind=kind, event=event)


def world_reasoning(facts: dict) -> str:
    return f"a {facts['relation']} got {facts['kind']}."


def write_demo_data(folder: Path, n_train: int, seed: int = 0) -> tuple[Path, Path]:
    """Generated stand-ins for dair-ai/emotion (its older data/{split}.jsonl.gz layout) and for
    syvai/reasoning-gen (question, answer, reasoning), written where the real loaders read them.
    Only the stage-1 corpus states the facts; the emotion rows carry text and label alone."""
    rng = random.Random(seed)
    people = world_people(seed)
    labels = list(data.LABELS)
    emotion = folder / "emotion"
    (emotion / "data").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", max(n_train // 8, 30)), ("test", max(n_train // 2, 60))):
        rows = []
        for _ in range(n):
            text, facts = world_sentence(rng, people)
            label = WORLD_FEELINGS.get((facts["kind"], facts["relation"]), "surprise")
            if rng.random() < DEMO_LABEL_NOISE:
                label = rng.choice(labels)
            rows.append({"text": text, "label": labels.index(label)})
        jsonl = "".join(json.dumps(r) + "\n" for r in rows)
        write_atomic(emotion / "data" / f"{split}.jsonl.gz", gzip.compress(jsonl.encode("utf-8")))
    write_atomic(emotion / "README.md", dataset_card(labels))  # the labels are ids: the card names them
    rgen_rows = []
    for i in range(RGEN_ROWS_PER_ROW * n_train):
        text, facts = world_sentence(rng, people)
        if i % 2:
            question, answer = VERDICT_QUESTION, VERDICTS.get((facts["kind"], facts["relation"]), "unexpected")
        else:
            question, answer = WHO_QUESTION, facts["name"]
        rgen_rows.append({"question": question.format(text=text), "answer": answer,
                          "reasoning": world_reasoning(facts)})
    rgen = folder / "reasoning-gen"
    write_reasoning_gen_demo(rgen, rgen_rows)
    return emotion, rgen


def dataset_card(names: list[str]) -> str:
    """A README.md whose YAML header names the label ids, as the hub's dataset cards do
    (dataset_info.features, a ClassLabel), which labelset.resolve reads."""
    entries = "".join(f"          '{i}': {name}\n" for i, name in enumerate(names))
    return ("---\ndataset_info:\n  features:\n  - name: text\n    dtype: string\n  - name: label\n    dtype:\n"
            "      class_label:\n        names:\n" + entries + "---\n\nA generated stand-in for dair-ai/emotion "
            "(pipeline.py --demo).\n")


def settings(out, rows: int, seed: int) -> dict:
    """The pipeline settings of the demo (they replace the defaults; the command line still wins):
    its files under OUT/demo_assets, and a size that a CPU trains in a few minutes."""
    assets = Path(out) / "demo_assets"
    return dict(base_model=str(assets / "tiny-llama"), rgen_data=str(assets / "data" / "reasoning-gen"),
                data=str(assets / "data" / "emotion"), device="cpu", dtype="fp32", lr=5e-4,
                rgen_examples=RGEN_ROWS_PER_ROW * rows, rgen_epochs=10.0, cls_epochs=20.0,
                rgen_max_seq_len=256, cls_max_seq_len=256, batch_size=16, grad_accum=1,
                augment_max_new_tokens=40, gen_batch_size=64)


def prepare(out, rows: int, seed: int):
    """Write the demo's data, tokenizer and tiny random model where settings() points, once.
    Everything after this runs the real code paths."""
    paths = settings(out, rows, seed)
    base, assets = Path(paths["base_model"]), Path(out) / "demo_assets"
    if (base / "config.json").is_file():
        return
    emotion, rgen = write_demo_data(assets / "data", rows, seed)
    texts = [r["text"] for r in readers.read_emotion(emotion, "train")]
    texts += [m["content"] for r in readers.iter_reasoning_gen(rgen) for m in data.example_messages("rgen", r)]
    config = checkpoint.config_from_json(DEMO_MODEL_CONFIG)
    # The learned vocabulary leaves room in the model's embedding for the chat format's tokens.
    tokenizer_dir = build_tokenizer(texts, assets / "tokenizer", chat_format="llama3",
                                    vocab_size=config.vocab_size - len(CHAT_TOKENS["llama3"]))
    torch.manual_seed(seed)
    checkpoint.save_model(Llama(config), base, Tokenizer(tokenizer_dir).serving_files())


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
