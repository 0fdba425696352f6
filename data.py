"""Data: the three tasks' prompts and targets, and how a row becomes a training example.

    TASKS                one table of what differs between the tasks: rgen (stage 1, question +
                         answer -> reasoning), q2a (text -> label) and q2ra (text -> reasoning,
                         then "<answer prefix> <label>"); the code asks it instead of the task's name
    prompt_messages ...  a task's user turn and reply for a row
    encode_example       one training example: ids, target mask, and how it was fitted to the
                         length limit (a classifier never loses its label)
    reply_budget         the max_new_tokens that a task's replies need, end-of-turn included
    load_examples        a task's training and validation examples, from the files to token ids
    collate ...          right-padded micro-batches that list the positions carrying a loss,
                         grouped by length, in a seeded order per epoch

The classifiers' wording and labels come from a labelset.LabelSet passed to every function
that needs them (default: labelset.EMOTION, dair-ai/emotion's). The chat format that turns a
task's messages into token ids is tokenizer.py's; the files the rows come from are read by
readers.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from tqdm import tqdm

import labelset
import readers
from labelset import EMOTION, LabelSet
from runtime import is_main, say
from tokenizer import Tokenizer


# ----------------------------------------------------------------------------- tasks

LABELS = readers.LABELS  # dair-ai/emotion's names in id order (the demo's and the benchmark's rows)
ANSWER_PREFIX = EMOTION.answer_prefix  # dair-ai/emotion's q2ra last line is exactly "Emotion: <label>"
PROMPT_VERSION = "v1"       # bump whenever a wording below (or labelset's) changes: trained models depend on it
DEFAULT_REASONING_TOKENS = 256  # stage 2's cap on a reasoning's length (new tokens)

RGEN_PROMPT = ("Write the reasoning that leads from the question to the answer.\n\n"
               "Question: {question}\n\nAnswer: {answer}")
# dair-ai/emotion's stage-2 question and classifier prompt as templates (the wording is labelset's)
EMOTION_QUESTION = labelset.EMOTION_QUESTION + labelset.TEXT_LINE + "{text}"
CLASSIFY_PROMPT = labelset.EMOTION_INSTRUCTION + labelset.TEXT_LINE + "{text}"


def _field(row: dict, name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"row {row.get('id', '?')}: field '{name}' is missing or empty")
    return value


def _label(row: dict, labels: LabelSet) -> str:
    if row.get("label") not in labels.names:
        raise ValueError(f"row {row.get('id', '?')}: label {row.get('label')!r} is not one of {labels.listed()}")
    return row["label"]


def answer_line(label: str, labels: LabelSet = EMOTION) -> str:
    """The q2ra target's last line."""
    return labels.answer_line(label)


def emotion_as_rgen(row: dict, labels: LabelSet = EMOTION) -> dict:
    """A labelled row as a stage-1 question/answer pair, for stage 2 to write its reasoning."""
    return {"id": row.get("id"), "question": labels.stage2_question(_field(row, "text")), "answer": _label(row, labels)}


def _rgen_user(row: dict, labels: LabelSet) -> str:
    return RGEN_PROMPT.format(question=_field(row, "question").strip(), answer=_field(row, "answer").strip())


def _classify_user(row: dict, labels: LabelSet) -> str:  # q2a and q2ra share it word for word
    return labels.prompt(_field(row, "text").strip())


def _q2ra_reply(row: dict, labels: LabelSet) -> str:
    return f"{_field(row, 'reasoning').strip()}\n{labels.answer_line(_label(row, labels))}"


def _longest_tokens(tokenizer: Tokenizer, texts) -> int:
    return max(len(tokenizer.encode(text)) for text in texts)


@dataclass(frozen=True)
class Task:
    """All that differs between the three tasks, so that the code asks this table, not the name."""
    rows: str                                # "reasoning-gen" (streamed), "emotion" (a labelled set) or
                                             # "augmented" (stage 2's jsonl)
    user: Callable[[dict, LabelSet], str]    # the user turn of a row (no system turn)
    reply: Callable[[dict, LabelSet], str]   # the assistant's reply: the training target
    max_seq_len: int                         # the default token limit per training example
    over_limit: str                          # a longer example is "cut" from the right, "shortened" in its
                                             # reasoning (the answer line stays) or "dropped"
    budget: Callable[[Tokenizer, int, LabelSet], int]  # max_new_tokens its replies need, end-of-turn
                                             # included, given stage 2's reasoning cap


TASKS = {
    "rgen": Task("reasoning-gen", _rgen_user, lambda row, labels: _field(row, "reasoning").strip(), 1024, "cut",
                 lambda tokenizer, cap, labels: cap),
    # q2a: room for a few words around the label, as a stray "Emotion: joy."
    "q2a": Task("emotion", _classify_user, _label, 512, "dropped",
                lambda tokenizer, cap, labels: max(8, 1 + _longest_tokens(tokenizer, labels.names))),
    "q2ra": Task("augmented", _classify_user, _q2ra_reply, 512, "shortened",
                 lambda tokenizer, cap, labels: cap + 1 + _longest_tokens(
                     tokenizer, ("\n" + labels.answer_line(x) for x in labels.names))),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}' (expected one of {', '.join(TASKS)})")
    return TASKS[name]


def prompt_messages(task: str, row: dict, labels: LabelSet = EMOTION) -> list[dict]:
    """The user turn of a task (no system turn)."""
    return [{"role": "user", "content": get_task(task).user(row, labels)}]


def target_text(task: str, row: dict, labels: LabelSet = EMOTION) -> str:
    """The assistant's reply: rgen the reasoning; q2a the label; q2ra the reasoning, then
    a last line "<answer prefix> <label>" ("Emotion: <label>" for dair-ai/emotion)."""
    return get_task(task).reply(row, labels)


def example_messages(task: str, row: dict, labels: LabelSet = EMOTION) -> list[dict]:
    return prompt_messages(task, row, labels) + [{"role": "assistant", "content": target_text(task, row, labels)}]


def encode_example(tokenizer: Tokenizer, task: str, row: dict, max_seq_len: int, labels: LabelSet = EMOTION) -> dict:
    """ids and target mask of one training example, at most max_seq_len tokens, and how it was
    made to fit (the task's over_limit): "whole"; "cut" (rgen: cut from the right, the reasoning
    loses its end); "shortened" (q2ra: the reasoning loses its last tokens, so that the answer
    line and the end-of-turn token stay); "dropped" (a classifier whose label cannot stay: ids
    are empty). A classifier never trains on a reply cut before its label: it would learn not
    to answer."""
    ids, mask = tokenizer.render(example_messages(task, row, labels))
    if len(ids) <= max_seq_len:
        return {"input_ids": ids, "target_mask": mask, "fit": "whole"}
    over_limit = get_task(task).over_limit
    if over_limit == "cut":
        fit = "cut" if any(mask[:max_seq_len]) else "dropped"
        return {"input_ids": ids[:max_seq_len], "target_mask": mask[:max_seq_len], "fit": fit}
    if over_limit == "shortened":
        reasoning = tokenizer.encode(_field(row, "reasoning").strip())
        keep = len(reasoning) - (len(ids) - max_seq_len)
        while keep > 0:  # re-encoding the shortened text can merge tokens differently: check, retry
            shorter = tokenizer.decode(reasoning[:keep]).strip()
            if not shorter:
                break
            ids, mask = tokenizer.render(example_messages(task, {**row, "reasoning": shorter}, labels))
            if len(ids) <= max_seq_len:
                return {"input_ids": ids, "target_mask": mask, "fit": "shortened"}
            keep -= len(ids) - max_seq_len
    return {"input_ids": [], "target_mask": [], "fit": "dropped"}


def reply_budget(tokenizer: Tokenizer, task: str, reasoning_tokens: int = DEFAULT_REASONING_TOKENS,
                 labels: LabelSet = EMOTION) -> int:
    """max_new_tokens that a reply of `task` needs, its end-of-turn token included, so that a
    model that reproduces its training targets is never cut off: q2ra, the stage-2 reasoning
    cap (reasoning_tokens) plus the longest answer line; q2a, the longest label, but at least 8;
    rgen, the reasoning cap."""
    return get_task(task).budget(tokenizer, reasoning_tokens, labels)


# ----------------------------------------------------------------------------- examples and batches

class Example(NamedTuple):
    ids: torch.Tensor        # (T,) int32 token ids of the whole conversation
    is_target: torch.Tensor  # (T,) bool: the assistant's reply tokens and its end-of-turn token


class Batch(NamedTuple):
    input_ids: torch.Tensor  # (B, T) right-padded
    loss_pos: torch.Tensor   # (N,) flat index b * T + t of each position whose next token is a target
    targets: torch.Tensor    # (N,) that next token
    n_tokens: int            # real (non-padding) tokens, for the speed readout

    def to(self, device):
        return self._replace(**{k: getattr(self, k).to(device, non_blocking=True)
                                for k in ("input_ids", "loss_pos", "targets")})


def load_examples(task: str, source, tokenizer: Tokenizer, max_seq_len: int, max_examples: int = 0,
                  val_examples: int = 0, val_source="", seed: int = 0, skip_bad: bool = False,
                  rgen_columns: str = "", labels: LabelSet = EMOTION) -> tuple[list[Example], list[Example], dict]:
    """Training and validation examples of a task, tokenized; plus what the data turned out to
    be: counts of what was cut, shortened, dropped or skipped, stage 2's reasoning cap (q2ra) and
    the reply budget (max_new_tokens) that the model's replies need. labels: the classifiers'
    label set and wording. See train.TrainConfig for what each other argument means."""
    if get_task(task).rows == "reasoning-gen":
        # Streamed: 350k rows (3 GB) never sit in memory as text. Every k-th example is held out,
        # so that validation, like training, covers the whole set (the rows come in the set's order).
        limit = max_examples + val_examples if max_examples else None
        rows = readers.iter_reasoning_gen(source, max_examples=limit, skip_bad=skip_bad,
                                          columns=readers.parse_rgen_columns(rgen_columns))
        examples, fits = encode(task, tokenizer, rows, max_seq_len, "rgen")
        n_val = held_out_count(val_examples, len(examples))
        held_out = set(range(0, n_val * (len(examples) // n_val), len(examples) // n_val)) if n_val else set()
        train_set = [ex for i, ex in enumerate(examples) if i not in held_out]
        val_set, skipped = [ex for i, ex in enumerate(examples) if i in held_out], rows.skipped
        reasoning_tokens = None
    else:
        train_rows = emotion_rows(get_task(task).rows, source, "train", skip_bad, labels)
        skipped, val_rows, reasoning_tokens = train_rows.skipped, None, train_rows.settings.get("max_new_tokens")
        if val_examples and val_source:
            val_rows = emotion_rows(get_task(task).rows, val_source, "validation", skip_bad, labels)
            skipped += val_rows.skipped
            val_rows = val_rows[:val_examples]
        elif val_examples and not Path(source).is_file():  # a single file is one split only
            try:
                val_rows = emotion_rows("emotion", source, "validation", skip_bad, labels)
                skipped += val_rows.skipped
                val_rows = val_rows[:val_examples]
            except FileNotFoundError:
                pass
        if val_rows is None:  # no validation split: hold out a seeded random slice of the training rows
            order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(seed)).tolist()
            held_out = set(order[:held_out_count(val_examples, len(train_rows))])
            val_rows = [row for i, row in enumerate(train_rows) if i in held_out]
            train_rows = [row for i, row in enumerate(train_rows) if i not in held_out]
        if max_examples:
            train_rows = train_rows[:max_examples]
        (train_set, fits), (val_set, val_fits) = (encode(task, tokenizer, train_rows, max_seq_len, "training", labels),
                                                  encode(task, tokenizer, val_rows, max_seq_len, "validation", labels))
        fits = {k: fits[k] + val_fits[k] for k in fits}
    if skipped:
        say("data", f"--skip-bad: {skipped} bad rows were skipped (the warnings above name them)")
    # The longest reply a classifier may have to write: what its training targets allow, at least.
    budget = max([reply_budget(tokenizer, task, reasoning_tokens or DEFAULT_REASONING_TOKENS, labels)]
                 + [int(ex.is_target.sum()) for ex in train_set + val_set])
    return train_set, val_set, {**fits, "skipped_bad_rows": skipped, "reasoning_tokens": reasoning_tokens,
                                "max_new_tokens": budget,
                                "label_set": None if get_task(task).rows == "reasoning-gen" else labels.settings()}


def emotion_rows(kind: str, source, split: str, skip_bad: bool, labels: LabelSet = EMOTION) -> readers.Rows:
    """Labelled rows of one split, in id order; kind "augmented": a file is stage 2's output, which
    holds the reasoning. Id order, not file order: stage 2 writes rows as they finish, shortest
    texts first, so that the first N rows of its file would be another set than q2a's first N."""
    if kind == "augmented" and Path(source).is_file():
        rows = readers.read_augmented(source, skip_bad=skip_bad, names=labels.names)
    else:
        rows = readers.read_labelled(source, split, labels.names, labels.text_column, labels.label_column, skip_bad)
    rows.sort(key=lambda row: (isinstance(row["id"], str), row["id"]))  # ints and strings apart
    return rows


def held_out_count(val_examples: int, n_rows: int) -> int:
    """Validation examples taken from the training rows: val_examples, but no more than a tenth (rounded up)."""
    return min(val_examples, math.ceil(n_rows / 10))


FITS = {"cut": "cut from the right", "shortened": "shortened in their reasoning (the answer line kept)",
        "dropped": "dropped (no reply token, or no room for the label, would be left)"}


def encode(task: str, tokenizer: Tokenizer, rows, max_seq_len: int, name: str = "",
           labels: LabelSet = EMOTION) -> tuple[list[Example], dict]:
    """Token ids and target masks; returns them with the counts of the examples longer than
    max_seq_len, by what was done to them (encode_example): {cut,shortened,dropped}_examples."""
    examples, fits, n_rows = [], dict.fromkeys(FITS, 0), 0
    for row in tqdm(rows, desc=f"tokenize {name}", unit="row", leave=False, disable=not is_main()):
        n_rows += 1
        ex = encode_example(tokenizer, task, row, max_seq_len, labels)
        if ex["fit"] != "whole":
            fits[ex["fit"]] += 1
        if ex["fit"] != "dropped":
            examples.append(Example(torch.tensor(ex["input_ids"], dtype=torch.int32),
                                    torch.tensor(ex["target_mask"], dtype=torch.bool)))
    for fit, n in fits.items():
        if n:
            say("data", f"{n} of {n_rows} {name} examples were longer than --max-seq-len {max_seq_len}: {FITS[fit]}")
    return examples, {f"{fit}_examples": n for fit, n in fits.items()}


def batch_order(lengths: list[int], batch_size: int, chunk: int, seed: int, epoch: int) -> list[list[int]]:
    """Micro-batches (lists of example indices) of one epoch, the same for the same seed and epoch.

    Shuffle, sort by length within chunks of `chunk` micro-batches (so a batch's rows have
    similar lengths and padding is small), then shuffle the batches (so lengths do not
    trend within a chunk)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    batches, span = [], chunk * batch_size
    for start in range(0, len(perm), span):
        part = sorted(perm[start:start + span], key=lambda i: lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def optimizer_steps(lengths: list[int], batch_size: int, grad_accum: int, chunk: int, seed: int,
                    epoch: int) -> list[list[list[int]]]:
    """The epoch's batch order, grouped into optimizer steps of grad_accum micro-batches (the last may have fewer)."""
    batches = batch_order(lengths, batch_size, chunk, seed, epoch)
    return [batches[i:i + grad_accum] for i in range(0, len(batches), grad_accum)]


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad a micro-batch and list the positions that carry a loss."""
    T = max(len(ex.ids) for ex in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    is_target = torch.zeros((len(examples), T), dtype=torch.bool)
    for b, ex in enumerate(examples):
        ids[b, :len(ex.ids)] = ex.ids
        is_target[b, :len(ex.ids)] = ex.is_target
    # Position t predicts token t + 1: it carries a loss when token t + 1 is a target.
    rows, cols = is_target[:, 1:].nonzero(as_tuple=True)                # (N,), (N,)
    return Batch(ids, rows * T + cols, ids[rows, cols + 1], sum(len(ex.ids) for ex in examples))
