"""Stage 2 of the method: a reasoning for every labelled row, written by the stage-1 generator.

    python augment.py --model runs/rgen/best --data dair-ai/emotion --split train --out aug.jsonl
    torchrun --nproc-per-node 4 augment.py --model runs/rgen/best --data SRC --split train --out aug.jsonl

Each row is asked the label set's stage-1 question (dair-ai/emotion's: "What emotion does this
text express?") with its gold label as the answer (data.emotion_as_rgen), and the generator's
reply is stored as the row's reasoning. The output is a crash-safe jsonl: each row is written
the moment it finishes, a rerun skips every id already written, and the settings it ran with
(model, data source, split, sampling, label set) sit beside it in OUT.meta.json; resuming with
other settings is refused.

Under torchrun the rows still to do are dealt out to the ranks (rank r of N takes every N-th of
them in length order), rank r writes aug.jsonl.part-r, and rank 0 merges the parts into
aug.jsonl at the end. A rerun, on any number of ranks, first merges what an interrupted run left
and skips every id already written; a row's tokens do not depend on its batch or rank, so the
file is the one a single process writes (rows in another order).
"""
from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

import checkpoint
import data as data_lib
import labelset
import readers
from labelset import EMOTION, LabelSet
from readers import settings_path
from files import write_atomic, write_json
from generate import EAGER, Decoder, GenerationFlags, SamplingConfig, compiled_decoder, generate_stream
from model import Llama
from tokenizer import Tokenizer
from runtime import (all_sum, barrier, distributed, one_line_errors, option, parse_config, rank_and_world,
                     resolve_device_dtype)

# ----------------------------------------------------------------------------- prompts and rows

def rgen_prompt(tokenizer, row: dict, labels: LabelSet = EMOTION) -> list[int]:
    """The rgen prompt for a labelled row, built by the same function that training uses."""
    messages = data_lib.prompt_messages("rgen", data_lib.emotion_as_rgen(row, labels))
    return tokenizer.render(messages, add_generation_prompt=True)[0]


def augment_rows(model: Llama, tokenizer, rows: list[dict], cfg: SamplingConfig, batch_size: int = 32,
                 decoder: Decoder = EAGER, labels: LabelSet = EMOTION):
    """Yield an output row (id, text, label, reasoning, n_tokens, hit_limit) for every labelled
    row, as each finishes (continuous batching: see generate_stream)."""
    prompts = [rgen_prompt(tokenizer, row, labels) for row in rows]
    # Random streams keyed by row id: a resumed or sharded run samples what a whole run would.
    keys = [zlib.crc32(str(row["id"]).encode()) for row in rows]
    for i, r in generate_stream(model, prompts, tokenizer.stop_ids, cfg, batch_size, keys, decoder=decoder):
        row = rows[i]
        yield {"id": row["id"], "text": row["text"], "label": row["label"],
               "reasoning": tokenizer.decode(r["ids"]).strip(), "n_tokens": r["n_tokens"], "hit_limit": r["hit_limit"]}


def complete_lines(path) -> list[tuple[object, str]]:
    """(id, line) of every row of the jsonl at path (none if it does not exist). A last line
    without its newline was torn by a crash mid-write: it is cut off, so that its row is
    generated again."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1                          # 0 when there is no complete line
    if end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
    rows = []
    for n, line in enumerate(raw[:end].decode("utf-8").splitlines(), 1):
        try:
            rows.append((json.loads(line)["id"], line))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}: line {n} is not a json row with an 'id'") from None
    return rows


def done_ids(path) -> set:
    """Ids already in the jsonl at path (empty if none); a torn last line is cut off (complete_lines)."""
    return {row_id for row_id, _ in complete_lines(path)}


class JsonlAppender:
    """Appends rows to a jsonl file as they come. Each row goes to the operating system at once
    (write + flush), so a process that is killed loses no row it finished; every sync_every rows,
    and at the end, they are forced to disk (fsync), so even a machine crash loses few. A kill
    mid-write leaves a torn last line, which complete_lines cuts off on the next run."""

    def __init__(self, path, sync_every: int = 32):
        self.file, self.sync_every, self.unsynced = open(path, "a", encoding="utf-8"), sync_every, 0

    def write(self, row: dict):
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()
        self.unsynced += 1
        if self.unsynced >= self.sync_every:
            self.sync()

    def sync(self):
        os.fsync(self.file.fileno())
        self.unsynced = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sync()
        self.file.close()


def part_path(out_path, rank: int, world: int) -> Path:
    """Where a rank appends its rows: out_path itself in a single process, out_path.part-RANK under torchrun."""
    out_path = Path(out_path)
    return out_path if world == 1 else out_path.with_name(f"{out_path.name}.part-{rank}")


def part_files(out_path) -> list[Path]:
    out_path = Path(out_path)
    prefix = out_path.name + ".part-"
    parts = [p for p in out_path.parent.iterdir() if p.name.startswith(prefix) and p.name[len(prefix):].isdigit()]
    return sorted(parts, key=lambda p: int(p.name[len(prefix):]))


def merge_parts(out_path):
    """Fold every part file into out_path, each id once, and remove the parts; repair a torn
    last line of out_path. A crash at any point leaves each row in out_path or a part (or
    both: hence the check for ids already taken), and the next merge completes the job."""
    out_path = Path(out_path)
    lines = complete_lines(out_path)
    parts = part_files(out_path)
    if not parts:
        return
    taken = {row_id for row_id, _ in lines}
    for part in parts:
        for row_id, line in complete_lines(part):
            if row_id not in taken:
                taken.add(row_id)
                lines.append((row_id, line))
    write_atomic(out_path, "".join(line + "\n" for _, line in lines))
    for part in parts:
        part.unlink()


def check_meta(out_path, meta: dict, force: bool):
    """Refuse to resume out_path (or its part files) with other settings than those in its
    sidecar, unless force; then (re)write the sidecar."""
    out_path = Path(out_path)
    meta_path = settings_path(out_path)
    if (out_path.exists() or part_files(out_path)) and not force:
        if not meta_path.is_file():
            raise ValueError(f"{out_path}: exists without {meta_path.name}, so its settings are unknown; "
                             f"use --force to resume it anyway, or another --out")
        try:
            old = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}: not valid JSON ({e}); use --force to rewrite it") from None
        diff = [f"{k}={old.get(k)!r} (now {v!r})" for k, v in meta.items() if old.get(k) != v]
        if diff:
            raise ValueError(f"{out_path}: was generated with {', '.join(diff)}; "
                             f"use --force to resume it anyway, or another --out")
    write_json(meta_path, meta)


def augment(model_dir, data, split, out_path, cfg: SamplingConfig | None = None, batch_size: int = 32,
            limit: int | None = None, force: bool = False, device=None, dtype=None, rows=None,
            compile: bool = False, labels: LabelSet | None = None, skip_bad: bool = False) -> dict:
    """Stage 2: write a reasoning for every labelled row of data/split (or of `rows`, when given)
    to out_path (jsonl: id, text, label, reasoning, n_tokens, hit_limit). Resumable: rows whose
    id is already in out_path are skipped. Returns (and prints) a summary. labels: the label set
    (default: the data's, labelset.resolve; with `rows`, dair-ai/emotion's); skip_bad: leave bad
    rows of data/split out (counted) instead of stopping at the first.

    In a process group (torchrun), every rank calls this: rank r of N generates every N-th of
    the remaining rows into out_path.part-r, and rank 0 merges the parts into out_path (see the
    module docstring); the summary counts the rows of all ranks."""
    cfg = cfg or SamplingConfig()
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    source = data if rows is None else "rows"
    labels = labels or (labelset.resolve(data) if rows is None else EMOTION)
    if rows is None:
        rows = readers.read_labelled(data, split, labels.names, labels.text_column, labels.label_column, skip_bad)
    rows = unique_rows(rows[:limit or None], source)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rank, world = rank_and_world()
    device, dtype = resolve_device_dtype(device, dtype)
    check_meta(out_path, run_settings(model_dir, source, split, cfg, labels), force)  # every rank: all stop alike
    barrier()                  # all checked the files as they were
    if rank == 0:
        merge_parts(out_path)  # the rows an interrupted run left in part files, whatever its rank count
    barrier()                  # all read the merged file, before any writes
    done = done_ids(out_path)
    # The prompt is a fixed template around the text, so the text's length orders the prompts.
    # Every rank sorts the same rows, and dealing them out in turn gives each rank the same mix
    # of lengths.
    todo = sorted((row for row in rows if row["id"] not in done), key=lambda row: len(row["text"]))
    start = time.time()
    counts = write_rows(part_path(out_path, rank, world), todo[rank::world], model_dir, cfg, batch_size,
                        device, dtype, compile, labels)
    if world > 1:
        totals = all_sum(list(counts.values()), device)  # also waits for every rank to finish its part
        counts = {k: int(v) for k, v in zip(counts, totals)}
        if rank == 0:
            merge_parts(out_path)
        barrier()              # the merged file is whole when any rank returns
    summary = {"out": str(out_path), **counts, "skipped": len(rows) - len(todo),
               "seconds": round(time.time() - start, 2)}
    if rank == 0:
        print(f"augment: wrote {summary['rows']} rows to {out_path} ({summary['skipped']} were already there), "
              f"{summary['tokens']} tokens, {summary['hit_limit']} hit the {cfg.max_new_tokens}-token limit, "
              f"{summary['empty']} empty replies, {summary['seconds']:.1f} s")
    return summary


def unique_rows(rows: list[dict], source) -> list[dict]:
    """The rows, after checking that no id appears twice (ids are how a resumed run knows its rows)."""
    seen = set()
    for row in rows:
        if row["id"] in seen:
            raise ValueError(f"{source}: id {row['id']!r} appears more than once")
        seen.add(row["id"])
    return rows


def run_settings(model_dir, source, split, cfg: SamplingConfig, labels: LabelSet = EMOTION) -> dict:
    """What an output file was made with: the model, the data source and split (ids 0..1999 exist
    in the train split and in the validation split), the prompt version, the sampling and the
    label set (whose names q2ra's training reads back from here)."""
    local_model, local_source = Path(model_dir).expanduser(), Path(str(source)).expanduser()
    return {"model": str(local_model.resolve()) if local_model.is_dir() else str(model_dir), "task": "rgen",
            "data": str(local_source.resolve()) if local_source.exists() else str(source), "split": split,
            "prompt_version": data_lib.PROMPT_VERSION, **asdict(cfg), "label_set": labels.settings()}


def write_rows(part: Path, rows: list[dict], model_dir, cfg: SamplingConfig, batch_size: int, device, dtype,
               compile: bool, labels: LabelSet = EMOTION) -> dict:
    """Generate this rank's rows into its file, each the moment it finishes; return the counts."""
    counts = {"rows": 0, "tokens": 0, "hit_limit": 0, "empty": 0}
    if not rows:  # a finished file needs no model
        part.touch()
        return counts
    folder = checkpoint.resolve_checkpoint(model_dir)  # a hub id is downloaded once
    model = checkpoint.load_model(folder, dtype, device).eval()
    tokenizer = Tokenizer(folder)
    decoder = compiled_decoder(device) if compile else EAGER
    rank, world = rank_and_world()
    bar = tqdm(total=len(rows), unit="row", desc="augment" if world == 1 else f"augment (rank 0 of {world})",
               disable=rank > 0)  # under torchrun, rank 0's share stands for the progress of all
    start = time.time()
    with JsonlAppender(part, sync_every=batch_size) as out:
        for row in augment_rows(model, tokenizer, rows, cfg, batch_size, decoder, labels):
            out.write(row)  # as soon as it finishes: a kill loses only the rows in flight
            counts["rows"] += 1
            counts["tokens"] += row["n_tokens"]
            counts["hit_limit"] += row["hit_limit"]
            counts["empty"] += not row["reasoning"]
            bar.set_postfix_str(f"{counts['tokens'] / (time.time() - start):.0f} tok/s", refresh=False)
            bar.update(1)
    bar.close()
    return counts


# ----------------------------------------------------------------------------- command line

@dataclass(kw_only=True)
class AugmentFlags(GenerationFlags, labelset.LabelFlags):
    model: str = field(metadata={"help": "the stage-1 checkpoint folder (or hub id)"})
    data: str = field(metadata={"help": "labelled text set: folder, file or hub id"})
    out: str = field(metadata={"help": "output jsonl; resumed if it exists"})
    split: str = option("train", "split of --data")
    batch_size: int = option(32, "rows decoded together; finished rows' places go to the next ones")
    limit: int = option(0, "only the first N rows (0: all)")
    force: bool = option(False, "resume --out even if its settings differ")
    skip_bad: bool = option(False, "skip (and count) bad data rows instead of stopping at the first one")


def main(argv=None):
    args = parse_config(AugmentFlags, argv, __doc__.split("\n\n")[0] + " Defaults are greedy decoding "
                        "(deterministic, reproducible). Rerun a command to resume it. On N GPUs: 'torchrun "
                        "--nproc-per-node N augment.py ...': each rank writes OUT.part-RANK, merged into OUT at "
                        "the end; a rerun resumes on any number of ranks.")
    with one_line_errors("augment.py", "interrupted; rerun the same command to resume"), \
            distributed(args.device) as device:  # joins torchrun's group, if launched by it
        augment(args.model, args.data, args.split, args.out, args.sampling(), args.batch_size, args.limit,
                args.force, device, args.dtype or None, compile=args.compile,
                labels=labelset.from_flags(args.data, args, args.skip_bad), skip_bad=args.skip_bad)


if __name__ == "__main__":
    main()
