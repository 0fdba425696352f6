"""A classification task's label set and wording, resolved once from the flags and the data and
then passed to every function that builds a prompt, parses a reply or scores one.

    LabelSet    the label names (in id order), the classifiers' instruction, the answer line's
                prefix, stage 2's question, and the columns that hold the text and the label
    resolve     the label set of a data source: --labels, else the data's own metadata (the
                ClassLabel names in a hub README's YAML header or in a parquet file's
                `huggingface` schema metadata, or stage 2's sidecar), else the sorted set of
                string labels of the training split
    EMOTION     dair-ai/emotion's six labels with the wording the method was built with
    LabelFlags  the five flags every stage takes (--text-column, --label-column, --labels,
                --instruction, --answer-prefix), declared once here: each stage's flags
                dataclass inherits them; FLAGS maps their names to default and help

A label set of exactly the six emotions keeps the emotion wording ("Classify the emotion ...",
"Emotion: <label>"), so that dair-ai/emotion's prompts are those of every model trained before
label sets could change; any other gets the generic wording, so that a new data set needs no
flag beyond --data.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import readers
from readers import LABELS
from runtime import option

EMOTION_INSTRUCTION = "Classify the emotion expressed in the text as one of: {labels}."
EMOTION_QUESTION = "What emotion does this text express? Choose one of: {labels}."
EMOTION_PREFIX = "Emotion:"
GENERIC_INSTRUCTION = "Classify the text as one of: {labels}."
GENERIC_PREFIX = "Label:"
TEXT_LINE = "\n\nText: "  # between the instruction (or question) and the text
MIN_LABELS, MAX_LABELS = 2, 50


@dataclass(frozen=True)
class LabelSet:
    names: tuple[str, ...]                 # in id order: id i is names[i]
    instruction: str = GENERIC_INSTRUCTION  # the classifiers' user turn before the text; {labels}: the names
    answer_prefix: str = GENERIC_PREFIX     # q2ra's last line is "<answer_prefix> <label>"
    question: str = ""                      # stage 2's question before the text ("": the instruction)
    text_column: str = "text"
    label_column: str = "label"

    def listed(self) -> str:
        return ", ".join(self.names)

    def prompt(self, text: str) -> str:
        """q2a's and q2ra's user turn (they share it word for word)."""
        return self.instruction.replace("{labels}", self.listed()) + TEXT_LINE + text

    def stage2_question(self, text: str) -> str:
        """The question stage 2 asks the generator, with the gold label as the answer."""
        return (self.question or self.instruction).replace("{labels}", self.listed()) + TEXT_LINE + text

    def answer_line(self, label: str) -> str:
        """q2ra's last line."""
        return f"{self.answer_prefix} {label}"

    def settings(self) -> dict:
        """What a run records (JSON types); from_settings reads it back."""
        return {**asdict(self), "names": list(self.names)}

    @classmethod
    def from_settings(cls, settings: dict) -> "LabelSet":
        return cls(**{**settings, "names": tuple(settings["names"])})


EMOTION = LabelSet(tuple(LABELS), EMOTION_INSTRUCTION, EMOTION_PREFIX, EMOTION_QUESTION)


# ----------------------------------------------------------------------------- flags

@dataclass(kw_only=True)
class LabelFlags:
    """The five flags every stage takes: a stage's flags dataclass inherits them (train.TrainConfig,
    augment.AugmentFlags, pipeline.PipelineConfig, eval.EvalFlags)."""
    text_column: str = option("text", "the column that holds the text")
    label_column: str = option("label", "the column that holds the label: a name, or an integer id")
    labels: str = option("", "the label names in id order, comma-separated (default: the data's ClassLabel "
                         "names, else the sorted set of the training split's string labels)")
    instruction: str = option("", "the classifiers' instruction before the text, {labels} filled in (default: "
                              f"'{GENERIC_INSTRUCTION}'; for the six emotions, dair-ai/emotion's "
                              f"'{EMOTION_INSTRUCTION}')")
    answer_prefix: str = option("", f"the prefix of q2ra's answer line (default: '{GENERIC_PREFIX}'; for the "
                                f"six emotions '{EMOTION_PREFIX}')")


FLAGS = {f.name: (f.default, f.metadata["help"]) for f in fields(LabelFlags)}  # name: (default, help)


def from_flags(source, flags, skip_bad: bool = False) -> LabelSet:
    """resolve() with the FLAGS fields of a config or argparse namespace."""
    return resolve(source, **{name: getattr(flags, name) for name in FLAGS}, skip_bad=skip_bad)


# ----------------------------------------------------------------------------- resolution

def resolve(source, labels: str = "", instruction: str = "", answer_prefix: str = "", text_column: str = "text",
            label_column: str = "label", skip_bad: bool = False) -> LabelSet:
    """The label set of `source` (a folder, file or hub id), see the module docstring; ValueError
    when there is none (integer ids with no names anywhere), or it has fewer than 2 or more than
    50 labels, or two names equal up to case."""
    if labels:
        names, origin = [name.strip() for name in labels.split(",")], "--labels"
    else:
        names, origin = metadata_names(source, label_column) or training_names(source, text_column, label_column,
                                                                               skip_bad)
    check_names(names, f"{source}: the labels from {origin}")
    emotion = sorted(names) == sorted(LABELS)
    if emotion and origin.startswith("the sorted"):
        names = list(LABELS)  # dair-ai/emotion's id order, which its prompts list them in
    if "\n" in answer_prefix or (answer_prefix and not answer_prefix.strip()):
        raise ValueError(f"--answer-prefix {answer_prefix!r}: one line, not empty")
    return LabelSet(tuple(names), instruction or (EMOTION_INSTRUCTION if emotion else GENERIC_INSTRUCTION),
                    answer_prefix.strip() or (EMOTION_PREFIX if emotion else GENERIC_PREFIX),
                    EMOTION_QUESTION if emotion and not instruction else "", text_column, label_column)


def check_names(names: list[str], what: str):
    if not MIN_LABELS <= len(names) <= MAX_LABELS:
        raise ValueError(f"{what} are {len(names)} ({', '.join(names)}): a classifier needs "
                         f"{MIN_LABELS} to {MAX_LABELS} labels")
    for name in names:
        if not name or "\n" in name or name.lower() == "unparsed":  # "unparsed": the report's column of no answer
            raise ValueError(f"{what}: a label name is empty, has a line break or is 'unparsed': {name!r}")
    seen = {}
    for name in names:
        if name.lower() in seen:
            raise ValueError(f"{what}: '{seen[name.lower()]}' and '{name}' are the same label up to case")
        seen[name.lower()] = name


def metadata_names(source, label_column: str) -> tuple[list[str], str] | None:
    """(names, where) from the data's own metadata, or None: stage 2's sidecar (for its jsonl), a
    hub README's dataset_info, or the first training file's parquet `huggingface` metadata."""
    path = readers.local_source(source, ignore_patterns=["unsplit/*"])
    sidecar = readers.settings_path(path)
    if path.is_file() and sidecar.is_file():
        names = json.loads(sidecar.read_text()).get("label_set", {}).get("names")
        return (names, str(sidecar)) if names else None
    readme = path / "README.md"
    if path.is_dir() and readme.is_file():
        names = readme_label_names(readme.read_text(encoding="utf-8"), label_column)
        if names:
            return names, f"{readme}'s ClassLabel names"
    try:
        first = readers.source_files(path, "train")[0]
    except FileNotFoundError:
        return None
    names = parquet_label_names(first, label_column) if first.name.endswith(".parquet") else None
    return (names, f"{first}'s ClassLabel names") if names else None


def training_names(source, text_column: str, label_column: str, skip_bad: bool) -> tuple[list[str], str]:
    """The sorted set of the training split's string labels; ValueError for integer ids."""
    rows = readers.read_labelled(source, "train", None, text_column, label_column, skip_bad)
    values = {row["label"] for row in rows}
    if any(isinstance(v, int) or v.isdigit() for v in values):
        raise ValueError(f"{source}: the labels are integer ids and the data names none of them: "
                         f"name them with --labels NAME0,NAME1,... (in id order)")
    return sorted(values), "the sorted set of the training split's labels"


def parquet_label_names(path, column: str) -> list[str] | None:
    """The ClassLabel names of `column` in a parquet file's `huggingface` schema metadata."""
    try:
        features = json.loads(readers.parquet_metadata(path).get(b"huggingface", b"{}"))["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return None
    feature = features.get(column) if isinstance(features, dict) else None
    names = feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
    return [str(name) for name in names] if names else None


def readme_label_names(text: str, column: str) -> list[str] | None:
    """The ClassLabel names of `column` in a hub README's YAML header (dataset_info: features:
    - name: COLUMN, dtype: class_label: names: '0': NAME ...), from the first config that has
    them. A line-based reader of that one structure: no YAML library at run time."""
    if not text.startswith("---"):
        return None
    lines = text.split("\n---", 1)[0].splitlines()[1:]
    for i, line in enumerate(lines):
        feature = re.fullmatch(r"(\s*)- name: *(.+?) *", line)
        if feature and _unquote(feature.group(2)) == column:
            names = _class_label_names(lines[i + 1:], len(feature.group(1)))
            if names:
                return names
    return None


def _class_label_names(lines: list[str], indent: int) -> list[str] | None:
    """The names under a feature's class_label: (its block: the lines indented deeper than its
    "- name:"), as a mapping ('0': joy) or a list (- joy); None if it has none."""
    names, under = {}, None  # under: the indentation of "names:" once found
    for line in filter(str.strip, lines):
        depth, item = len(line) - len(line.lstrip()), line.strip()
        if depth <= indent:
            break
        if under is None:
            under = depth if item == "names:" else None
            continue
        entry = re.fullmatch(r"""['"]?(\d+)['"]?: *(.+)""", item)
        if entry and depth > under:
            names[int(entry.group(1))] = _unquote(entry.group(2))
        elif item.startswith("- ") and depth >= under:
            names[len(names)] = _unquote(item[2:])
        else:
            break
    if not names or set(names) != set(range(len(names))):
        return None
    return [names[i] for i in range(len(names))]


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1].replace("''", "'")
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return json.loads(value)
    return value


LABEL_SET_FILE = "label_set.json"  # in every q2a/q2ra checkpoint: the label set it was trained with


def label_set_path(folder) -> Path:
    """Where a checkpoint records the label set it was trained with."""
    return Path(folder) / LABEL_SET_FILE
