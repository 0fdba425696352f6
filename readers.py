"""The data sets on disk (or on the hub): any labelled text set (dair-ai/emotion among them) in
the hub's layouts or as one file per split, syvai/reasoning-gen streamed shard by shard, and
stage 2's augmented jsonl, read into plain rows.

Readers raise a one-line ValueError naming the file and the row (1-based: "line N" in jsonl,
"row N" in csv and parquet) on bad data. With skip_bad=True bad rows are left out instead: the
lists returned are `Rows` and the stream a `RowStream`, both with a `skipped` count, and each
file with bad rows prints one warning to stderr.

References: Saravia et al. 2018 (the emotion dataset, CARER).
"""
from __future__ import annotations

import csv
import gzip
import json
import re
import sys
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

from files import read_json

LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]  # dair-ai/emotion's id order


# ----------------------------------------------------------------------------- readers

class Rows(list):
    """A list of rows; `skipped` counts the bad rows that skip_bad=True left out, and `settings`
    holds what made the file, where it says (read_augmented: stage 2's sidecar)."""

    def __init__(self, rows=(), skipped: int = 0, settings: dict | None = None):
        super().__init__(rows)
        self.skipped, self.settings = skipped, settings or {}


class RowStream:
    """An iterator of rows read lazily, at most `limit`; `skipped` counts the bad rows left out so far."""

    def __init__(self, items: Iterator, limit: int | None = None):
        self._items, self._left, self.skipped = items, limit, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._left is not None and self._left <= 0:
            raise StopIteration  # so the files after this one are never opened
        while (item := next(self._items)) is _SKIPPED:
            self.skipped += 1
        if self._left is not None:
            self._left -= 1
        return item


class _BadRow(Exception):
    pass


_SKIPPED = object()  # what a skipped bad row becomes on its way to RowStream


def _parquet_file(path: Path):
    try:
        import pyarrow
        import pyarrow.parquet as pq  # optional: only parquet files need it
    except ImportError:
        raise ModuleNotFoundError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        return pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None


def _columns(path: Path) -> list[str] | None:
    """The column names of a parquet, csv or tsv file; None for jsonl, whose rows each carry their own."""
    if path.name.endswith(".parquet"):
        return _parquet_file(path).schema_arrow.names
    if path.name.endswith((".csv", ".tsv")):
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f, delimiter=_delimiter(path)), [])
    return None


def _delimiter(path: Path) -> str:
    return "\t" if path.name.endswith(".tsv") else ","


def parquet_metadata(path) -> dict[bytes, bytes]:
    """A parquet file's schema metadata (the hub's files keep their features under b"huggingface")."""
    return _parquet_file(Path(path)).schema_arrow.metadata or {}


def _records(path: Path, columns: list[str] | None = None) -> Iterator[tuple[str, dict | None]]:
    """(where, record) for each row of a .parquet, .csv, .tsv or .jsonl(.gz) file; where is "row N"
    or "line N" (1-based); record is None for a line that is not a JSON object."""
    name = path.name
    if name.endswith(".parquet"):  # batch by batch: a 215 MB shard is never in memory whole
        n = 0
        for batch in _parquet_file(path).iter_batches(batch_size=1024, columns=columns):
            for record in batch.to_pylist():
                n += 1
                yield f"row {n}", record
    elif name.endswith((".csv", ".tsv")):
        with open(path, newline="", encoding="utf-8") as f:
            for n, record in enumerate(csv.DictReader(f, delimiter=_delimiter(path)), 1):
                yield f"row {n}", record
    elif name.endswith((".jsonl", ".jsonl.gz")):
        with (gzip.open(path, "rt", encoding="utf-8") if name.endswith(".gz") else open(path, encoding="utf-8")) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        record = None
                    yield f"line {n}", record if isinstance(record, dict) else None
    else:
        raise ValueError(f"{path}: unknown file type (expected .parquet, .csv, .tsv, .jsonl or .jsonl.gz)")


def _parse_file(path: Path, parse: Callable[[dict, int], dict], skip_bad: bool, first_index: int,
                columns: list[str] | None, wanted: Callable[[int], bool] | None = None):
    """Yield parse(record, index) for each row of one file, index counting every row (bad ones
    too) from first_index; return the number of rows. A bad row raises a one-line ValueError
    naming the file and row, or with skip_bad yields _SKIPPED (and the file gets one warning).
    wanted(index) False: the row is passed over unread (a bad one there is no error)."""
    n, n_bad, first_bad = 0, 0, None
    for where, record in _records(path, columns):
        if wanted is not None and not wanted(first_index + n):
            n += 1
            continue
        try:
            if record is None:
                raise _BadRow("not a JSON object")
            yield parse(record, first_index + n)
        except _BadRow as e:
            if not skip_bad:
                raise ValueError(f"{path}: {where}: {e} (skip_bad=True leaves bad rows out)") from None
            n_bad, first_bad = n_bad + 1, first_bad or f"{where}: {e}"
            yield _SKIPPED
        n += 1
    if n_bad:
        print(f"{path}: skipped {n_bad} bad row(s) of {n}; the first: {first_bad}", file=sys.stderr)
    return n


def _parse_files(files: list[Path], parser_for: Callable, skip_bad: bool, wanted=None):
    """_parse_file over several files (shards); parser_for(file) -> (parse, columns to read) is
    called only when the file's turn comes. Row indices continue across files."""
    index = 0
    for file in files:
        parse, columns = parser_for(file)
        index += yield from _parse_file(file, parse, skip_bad, index, columns, wanted)


def _collect(stream: RowStream) -> Rows:
    rows = list(stream)  # read whole first: the skipped count is final only then
    return Rows(rows, stream.skipped)


def local_source(source, **patterns) -> Path:
    """source as a local path; a hub dataset id (owner/name) is downloaded once into the HF cache."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    hub_id = re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", str(source)) and not str(source).endswith(
        (".jsonl", ".gz", ".csv", ".tsv", ".parquet", ".json"))
    if not hub_id:
        raise FileNotFoundError(f"{source}: no such file or folder")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(source), repo_type="dataset", **patterns))
    except Exception as e:  # offline, no such dataset, or gated
        first_line = (str(e).splitlines() or [""])[0]
        raise RuntimeError(f"{source}: not a local path, and downloading it from the Hugging Face hub failed "
                           f"(offline? {type(e).__name__}: {first_line})") from None


# ----------------------------------------------------------------------------- labelled text sets

SPLITS = ("train", "validation", "test")
EMOTION_SPLITS = SPLITS  # the name older code and tests use
SPLIT_NAMES = {"validation": ("validation", "valid", "val", "dev")}  # the file names the hub accepts for a split


def label_matcher(names) -> Callable[[object], str | None]:
    """value -> its name in `names`, or None: the name itself, the name in any case, or its id
    (an int, or digits); a name is tried before an id, so that labels "1".."5" stay names."""
    exact, lower = set(names), {name.lower(): name for name in names}

    def match(value):
        if isinstance(value, int) and not isinstance(value, bool):
            return names[value] if 0 <= value < len(names) else None
        if not isinstance(value, str):
            return None
        value = value.strip()
        if value in exact or value.lower() in lower:
            return value if value in exact else lower[value.lower()]
        return match(int(value)) if value.isdigit() else None
    return match


def _raw_label(value):
    """A label as the file has it, for a label set still to be found: a stripped name or an int id."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise _BadRow(f"label {value!r} is neither a name nor an integer id")


def _labelled_row(record: dict, index: int, columns=("text", "label"), names=None, match=None,
                  extra: tuple[str, ...] = ()) -> dict:
    """The record with its text and label under "text" and "label", the label a name of `names`
    (raw without names), and an id (its own, else index); _BadRow if unusable."""
    text_column, label_column = columns
    for name in (text_column, label_column) + extra:
        if record.get(name) is None:
            raise _BadRow(f"missing field '{name}' (found: {', '.join(record) or 'nothing'})")
    if not isinstance(record[text_column], str) or not record[text_column].strip():
        raise _BadRow("empty text" + (f" (column '{text_column}')" if text_column != "text" else ""))
    label = _raw_label(record[label_column]) if names is None else match(record[label_column])
    if label is None:
        raise _BadRow(f"unknown label {record[label_column]!r} (expected 0-{len(names) - 1} or one of "
                      f"{', '.join(names)})")
    for name in extra:
        if not isinstance(record[name], str) or not record[name].strip():
            raise _BadRow(f"empty {name}")
    row_id = record["id"] if record.get("id") is not None else index
    return {**record, "id": row_id, "text": record[text_column], "label": label}


def split_files(folder: Path, split: str) -> list[Path]:
    # The hub's "split" config (split/), an export or mirror (data/), a config folder itself
    # (point at .../unsplit to read dair-ai/emotion's: its 417k rows overlap the split config's
    # test set, so it is never picked implicitly), data/{split}.jsonl.gz, and plain files.
    patterns = []
    for name in SPLIT_NAMES.get(split, (split,)):
        patterns += [f"split/{name}-*.parquet", f"data/{name}-*.parquet", f"{name}-*.parquet",
                     f"data/{name}.jsonl.gz", f"{name}.jsonl", f"{name}.jsonl.gz", f"{name}.csv", f"{name}.tsv",
                     f"{name}.parquet", f"data/{name}.jsonl", f"data/{name}.csv", f"data/{name}.tsv"]
    for pattern in patterns:
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"{folder}: no '{split}' split here (looked for {', '.join(patterns)})")


def source_files(source, split: str) -> list[Path]:
    """The files of one split: source a folder in one of the hub's layouts (see split_files), a
    single .parquet/.jsonl(.gz)/.csv/.tsv file (which is the split), or a hub id (downloaded once)."""
    if split not in SPLITS:
        raise ValueError(f"split '{split}' is not one of {', '.join(SPLITS)}")
    path = local_source(source, ignore_patterns=["unsplit/*"])  # dair-ai/emotion: 27 MB we would never read
    return [path] if path.is_file() else split_files(path, split)


def read_labelled(source, split: str, names=None, text_column: str = "text", label_column: str = "label",
                  skip_bad: bool = False) -> Rows:
    """Rows {id, text, label} of a labelled text set's split: label one of `names`, read as the
    name (any case) or its id (0-based, in the order of names); with names None, the label as
    the file has it (a name, or an int id). id is the file's id column, else the row's index in
    the split. Columns are found by name (text_column, label_column)."""
    files = source_files(source, split)
    for file in files:  # checked up front: wrong columns are the file's fault, never skipped
        found = _columns(file)
        if found is not None and not {text_column, label_column} <= set(found):
            raise ValueError(f"{file}: expected columns {text_column} and {label_column}, found: "
                             f"{', '.join(found) or 'none'} (name them with --text-column and --label-column)")
    match = None if names is None else label_matcher(names)

    def parse(record, index):
        row = _labelled_row(record, index, (text_column, label_column), names, match)
        return {"id": row["id"], "text": row["text"], "label": row["label"]}
    return _collect(RowStream(_parse_files(files, lambda file: (parse, None), skip_bad)))


def read_emotion(source, split: str, skip_bad: bool = False) -> Rows:
    """dair-ai/emotion rows {id, text, label}, label a LABELS name (read_labelled with its names)."""
    return read_labelled(source, split, LABELS, skip_bad=skip_bad)


def read_augmented(path, skip_bad: bool = False, names=LABELS) -> Rows:
    """Stage 2's output: jsonl rows {id, text, label, reasoning, ...}, every field kept, label a
    name of `names`; `settings` holds what stage 2 ran with (its sidecar, see settings_path; {}
    without)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    match = label_matcher(names)

    def parse(record, index):
        return _labelled_row(record, index, names=names, match=match, extra=("reasoning",))
    rows = _collect(RowStream(_parse_files([path], lambda file: (parse, None), skip_bad)))
    rows.settings = read_json(settings_path(path)) if settings_path(path).is_file() else {}
    return rows


def settings_path(jsonl) -> Path:
    """Where stage 2 records the settings of an output file: OUT.jsonl -> OUT.jsonl.meta.json."""
    jsonl = Path(jsonl)
    return jsonl.with_name(jsonl.name + ".meta.json")


# ----------------------------------------------------------------------------- reasoning-gen

# syvai/reasoning-gen's columns are read from each file and matched by name to these roles.
# (Its dataset card is not in our references; the paper names the parts question, answer and
# reasoning, so we accept those and the usual aliases, and name the columns found otherwise.)
RGEN_COLUMNS = {
    "question": ("question", "prompt", "instruction", "input", "query", "problem"),
    "answer": ("answer", "response", "output", "completion", "final_answer", "solution"),
    "reasoning": ("reasoning", "rationale", "thinking", "thoughts", "thought", "explanation", "chain_of_thought", "cot"),
}


def _rgen_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    for pattern in ("**/train-*.parquet", "**/*.parquet", "**/*.jsonl", "**/*.jsonl.gz"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"{path}: no .parquet or .jsonl files here")


def parse_rgen_columns(spec: str) -> dict[str, str]:
    """"question=COL,answer=COL,reasoning=COL" (any of the three roles) as {role: column}."""
    columns = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        role, _, column = part.partition("=")
        if role.strip() not in RGEN_COLUMNS or not column.strip():
            raise ValueError(f"--rgen-columns: '{part}' is not ROLE=COLUMN with ROLE one of {', '.join(RGEN_COLUMNS)}")
        columns[role.strip()] = column.strip()
    return columns


def _rgen_parser(file: Path, chosen: dict[str, str]):
    """The row parser for one reasoning-gen file and the columns it reads: the columns chosen
    by role (--rgen-columns), else the first alias of each role among the file's columns."""
    found = _columns(file)
    if found is None:  # jsonl: the first record's keys
        found = next((list(record) for _, record in _records(file) if record is not None), [])
    by_lower = {name.lower(): name for name in found}
    columns = {role: chosen.get(role) or next((by_lower[a] for a in aliases if a in by_lower), None)
               for role, aliases in RGEN_COLUMNS.items()}
    for role, column in chosen.items():
        if column not in found:
            raise ValueError(f"{file}: no column '{column}' for {role} (found: {', '.join(found) or 'none'})")
    missing = [role for role, column in columns.items() if column is None]
    if missing:
        raise ValueError(f"{file}: no column for {', '.join(missing)} (found: {', '.join(found) or 'none'}; "
                         f"accepted: {'; '.join('/'.join(a) for a in RGEN_COLUMNS.values())}; name them with "
                         f"--rgen-columns question=COL,answer=COL,reasoning=COL)")
    id_column = by_lower.get("id")

    def parse(record, index):
        row = {"id": record.get(id_column) if id_column else None}
        for role, column in columns.items():
            value = record.get(column)
            if not isinstance(value, str) or not value.strip():
                raise _BadRow(f"{'missing' if value is None else 'empty'} {role} (column '{column}')")
            row[role] = value
        row["id"] = index if row["id"] is None else row["id"]
        return row
    return parse, list(columns.values()) + ([id_column] if id_column else [])


def iter_reasoning_gen(source, max_examples: int | None = None, skip_bad: bool = False,
                       columns: dict[str, str] | None = None) -> RowStream:
    """syvai/reasoning-gen rows {id, question, answer, reasoning}, streamed shard by shard and
    batch by batch (the real set is ~350k rows of math, code and science in ~215 MB parquet
    shards). max_examples: that many rows spread evenly over all shards (rows i * total // n),
    not the first ones, which would all come from one part of the set if its shards are grouped
    by domain. source: folder, file or hub id. id is the file's id column, else the row's index
    over all shards. columns: {role: column name} for roles whose column has no known alias."""
    files = _rgen_files(local_source(source))
    wanted = None
    if max_examples:
        total = sum(_row_count(f) for f in files)
        if total > max_examples:
            picked = {i * total // max_examples for i in range(max_examples)}
            wanted = picked.__contains__
    return RowStream(_parse_files(files, partial(_rgen_parser, chosen=columns or {}), skip_bad, wanted), max_examples)


def _row_count(path: Path) -> int:
    """Rows of a file as _records counts them: a parquet file's from its footer, no data read."""
    if path.name.endswith(".parquet"):
        return _parquet_file(path).metadata.num_rows
    return sum(1 for _ in _records(path))
