"""The data sets on disk (or on the hub): dair-ai/emotion in its hub layouts, syvai/reasoning-gen
streamed shard by shard, and stage 2's augmented jsonl, read into plain rows.

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
    """The column names of a parquet or csv file; None for jsonl, whose rows each carry their own."""
    if path.name.endswith(".parquet"):
        return _parquet_file(path).schema_arrow.names
    if path.name.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), [])
    return None


def _records(path: Path, columns: list[str] | None = None) -> Iterator[tuple[str, dict | None]]:
    """(where, record) for each row of a .parquet, .csv or .jsonl(.gz) file; where is "row N"
    or "line N" (1-based); record is None for a line that is not a JSON object."""
    name = path.name
    if name.endswith(".parquet"):  # batch by batch: a 215 MB shard is never in memory whole
        n = 0
        for batch in _parquet_file(path).iter_batches(batch_size=1024, columns=columns):
            for record in batch.to_pylist():
                n += 1
                yield f"row {n}", record
    elif name.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            for n, record in enumerate(csv.DictReader(f), 1):
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
        raise ValueError(f"{path}: unknown file type (expected .parquet, .csv, .jsonl or .jsonl.gz)")


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


def _local_or_download(source, **patterns) -> Path:
    """source as a local path; a hub dataset id (owner/name) is downloaded once into the HF cache."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    hub_id = re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", str(source)) and not str(source).endswith(
        (".jsonl", ".gz", ".csv", ".parquet", ".json"))
    if not hub_id:
        raise FileNotFoundError(f"{source}: no such file or folder")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(source), repo_type="dataset", **patterns))
    except Exception as e:  # offline, no such dataset, or gated
        first_line = (str(e).splitlines() or [""])[0]
        raise RuntimeError(f"{source}: not a local path, and downloading it from the Hugging Face hub failed "
                           f"(offline? {type(e).__name__}: {first_line})") from None


# ----------------------------------------------------------------------------- emotion

EMOTION_SPLITS = ("train", "validation", "test")


def _label_name(value) -> str | None:
    """A label id 0-5 (int or digits) or name (any case) as its LABELS name; None if neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return LABELS[value] if 0 <= value < len(LABELS) else None
    if isinstance(value, str):
        value = value.strip().lower()
        return _label_name(int(value)) if value.isdigit() else value if value in LABELS else None
    return None


def _emotion_row(record: dict, index: int, extra: tuple[str, ...] = ()) -> dict:
    """The record with label as a LABELS name and an id (its own, else index); _BadRow if unusable."""
    for name in ("text", "label") + extra:
        if record.get(name) is None:
            raise _BadRow(f"missing field '{name}' (found: {', '.join(record) or 'nothing'})")
    if not isinstance(record["text"], str) or not record["text"].strip():
        raise _BadRow("empty text")
    label = _label_name(record["label"])
    if label is None:
        raise _BadRow(f"unknown label {record['label']!r} (expected 0-5 or one of {', '.join(LABELS)})")
    for name in extra:
        if not isinstance(record[name], str) or not record[name].strip():
            raise _BadRow(f"empty {name}")
    return {**record, "id": record["id"] if record.get("id") is not None else index, "label": label}


def _emotion_files(folder: Path, split: str) -> list[Path]:
    # The hub's "split" config (split/), an export or mirror (data/), a config folder itself
    # (point at .../unsplit to read that config: its 417k rows overlap the split config's test
    # set, so it is never picked implicitly), the older data/{split}.jsonl.gz, and plain files.
    patterns = [f"split/{split}-*.parquet", f"data/{split}-*.parquet", f"{split}-*.parquet",
                f"data/{split}.jsonl.gz", f"{split}.jsonl", f"{split}.jsonl.gz", f"{split}.csv", f"{split}.parquet"]
    for pattern in patterns:
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"{folder}: no '{split}' split here (looked for {', '.join(patterns)})")


def read_emotion(source, split: str, skip_bad: bool = False) -> Rows:
    """dair-ai/emotion rows {id, text, label}: label a LABELS name, id the file's id column or
    else the row's index in the split. source: a folder in one of the hub's layouts (see
    _emotion_files), a single .parquet/.jsonl(.gz)/.csv file (which is the split), or a hub id.
    Labels may be ids 0-5 or names."""
    if split not in EMOTION_SPLITS:
        raise ValueError(f"split '{split}' is not one of {', '.join(EMOTION_SPLITS)}")
    path = _local_or_download(source, ignore_patterns=["unsplit/*"])  # 27 MB we would never read
    files = [path] if path.is_file() else _emotion_files(path, split)
    for file in files:  # checked up front: wrong columns are the file's fault, never skipped
        found = _columns(file)
        if found is not None and not {"text", "label"} <= set(found):
            raise ValueError(f"{file}: expected columns text and label, found: {', '.join(found) or 'none'}")

    def parse(record, index):
        row = _emotion_row(record, index)
        return {"id": row["id"], "text": row["text"], "label": row["label"]}
    return _collect(RowStream(_parse_files(files, lambda file: (parse, None), skip_bad)))


def read_augmented(path, skip_bad: bool = False) -> Rows:
    """Stage 2's output: jsonl rows {id, text, label, reasoning, ...}, every field kept, label as
    a name; `settings` holds what stage 2 ran with (its sidecar, see settings_path; {} without)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")

    def parse(record, index):
        return _emotion_row(record, index, extra=("reasoning",))
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
    files = _rgen_files(_local_or_download(source))
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
