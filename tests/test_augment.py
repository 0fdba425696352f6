"""augment.py (stage 2) on a tiny random model: the crash-safe jsonl (torn lines, part files,
the settings sidecar), a run killed with SIGKILL and resumed, shards and resumes that sample
what a whole run samples, and refusals to mix sources or splits."""
import json
from functools import partial
import os
import signal
import subprocess

import pytest

from augment import JsonlAppender, check_meta, done_ids, merge_parts
from generate import SamplingConfig
from helpers import line_count, read_rows, run_script, start_script, wait_for
from tiny import emotion_file


def append_rows(path, rows):
    with JsonlAppender(path) as out:
        for row in rows:
            out.write(row)


def run_cli(*args, check=True) -> subprocess.CompletedProcess:
    return run_script("augment.py", *args, check=check)


# ----------------------------------------------------------------------------- stage-2 file handling

def test_done_ids_cuts_a_torn_last_line_and_names_a_bad_one(tmp_path):
    out = tmp_path / "aug.jsonl"
    assert done_ids(out) == set()
    append_rows(out, [{"id": 1, "reasoning": "a"}, {"id": "b", "reasoning": "é"}])
    whole = out.read_bytes()
    with open(out, "ab") as f:
        f.write(b'{"id": 3, "reaso')                   # a write cut short by a kill
    assert done_ids(out) == {1, "b"}
    assert out.read_bytes() == whole                   # repaired: the torn tail is gone
    append_rows(out, [{"id": 3}])
    assert done_ids(out) == {1, "b", 3}
    out.write_text('{"id": 1}\nnot json\n')
    with pytest.raises(ValueError, match="aug.jsonl: line 2"):
        done_ids(out)


def test_sidecar_refuses_other_settings_unless_forced(tmp_path):
    out = tmp_path / "aug.jsonl"
    meta = {"model": "m", "prompt_version": "1", "max_new_tokens": 256}
    check_meta(out, meta, force=False)                 # new file: the sidecar is written
    meta_path = tmp_path / "aug.jsonl.meta.json"
    assert json.loads(meta_path.read_text()) == meta
    out.write_text("")
    check_meta(out, meta, force=False)                 # same settings: resume
    with pytest.raises(ValueError, match=r"max_new_tokens=256 \(now 64\).*--force"):
        check_meta(out, {**meta, "max_new_tokens": 64}, force=False)
    check_meta(out, {**meta, "max_new_tokens": 64}, force=True)
    assert json.loads(meta_path.read_text())["max_new_tokens"] == 64
    meta_path.unlink()
    with pytest.raises(ValueError, match="settings are unknown"):
        check_meta(out, meta, force=False)
    out.unlink()                                       # only the part file of a sharded run: the same
    (tmp_path / "aug.jsonl.part-1").write_text("")
    with pytest.raises(ValueError, match="settings are unknown"):
        check_meta(out, meta, force=False)


def test_merge_parts_takes_each_id_once_and_repairs_torn_lines(tmp_path):
    """As after a crash between the merged file's rename and the removal of the parts: ids 2 and
    3 are in both; part-1 and the merged file end in torn lines; part-10 sorts after part-2."""
    out = tmp_path / "aug.jsonl"
    append_rows(out, [{"id": i} for i in (0, 2, 3)])
    for rank, ids in ((10, [9]), (1, [1, 3, 5]), (2, [2, 4])):
        append_rows(tmp_path / f"aug.jsonl.part-{rank}", [{"id": i, "rank": rank} for i in ids])
    for torn in (out, tmp_path / "aug.jsonl.part-1"):
        with open(torn, "a") as f:
            f.write('{"id": 7, "rea')
    (tmp_path / "aug.jsonl.part-x").write_text("not ours")
    merge_parts(out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"id": 0}, {"id": 2}, {"id": 3}, {"id": 1, "rank": 1}, {"id": 5, "rank": 1},
                    {"id": 4, "rank": 2}, {"id": 9, "rank": 10}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aug.jsonl", "aug.jsonl.part-x"]
    merge_parts(out)                                   # nothing to merge: unchanged
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows



# ----------------------------------------------------------------------------- stage 2 end to end

def test_stage2_survives_sigkill_and_a_torn_line(model_dir, tmp_path):
    n = 16
    src = emotion_file(tmp_path, n)
    common = ["--model", model_dir, "--data", src, "--split", "train", "--labels", "sadness,joy,love,anger,fear,surprise",
              "--batch-size", 2, "--max-new-tokens", 32]  # the file's labels are ids: --labels names them
    run_cli(*common, "--out", tmp_path / "whole.jsonl")
    whole, count = read_rows(tmp_path / "whole.jsonl")
    assert count == n and sorted(whole) == list(range(n))
    assert set(whole[0]) == {"id", "text", "label", "reasoning", "n_tokens", "hit_limit"}
    assert whole[0]["label"] == "sadness" and whole[0]["n_tokens"] > 0
    assert len({r["reasoning"] for r in whole.values()}) > n // 2  # rows differ: the comparison below means something

    out = tmp_path / "resumed.jsonl"
    proc = start_script("augment.py", *common, "--out", out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: line_count(out) >= 2, proc, timeout=120)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    partial, count = read_rows(out)
    assert 2 <= count < n                              # killed part-way
    with open(out, "a") as f:                          # and a crash in the middle of a write
        f.write(json.dumps(whole[next(i for i in range(n) if i not in partial)])[:25])
    run_cli(*common, "--out", out)
    resumed, count = read_rows(out)
    assert count == n and resumed == whole             # no duplicates, none lost, same replies

    refused = run_cli(*common[:-1], 16, "--out", out, check=False)
    assert refused.returncode == 1
    assert "max_new_tokens=32 (now 16)" in refused.stderr and "--force" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    forced = run_cli(*common[:-1], 16, "--out", out, "--force", "--limit", n + 2)
    assert "wrote 0 rows" in forced.stdout and read_rows(out)[1] == n


def test_stage2_refuses_to_resume_from_another_split_or_source(model_dir, tmp_path):
    """Ids 0..1999 exist in the train split and in the validation split: the sidecar records the
    source and the split, and a resume from another is one clear error."""
    import readers
    from augment import augment as augment_any
    from labelset import EMOTION
    augment = partial(augment_any, labels=EMOTION)  # the file's labels are dair-ai/emotion's ids
    src = emotion_file(tmp_path, 3)
    out, cfg = tmp_path / "aug.jsonl", SamplingConfig(max_new_tokens=4)
    augment(model_dir, src, "train", out, cfg, limit=2)
    meta = json.loads(readers.settings_path(out).read_text())
    assert meta["data"] == str(src.resolve()) and meta["split"] == "train"
    with pytest.raises(ValueError, match=r"aug\.jsonl: was generated with split='train' \(now 'validation'\)"):
        augment(model_dir, src, "validation", out, cfg)
    other = tmp_path / "other" / "train.jsonl"
    other.parent.mkdir()
    other.write_text(src.read_text())
    with pytest.raises(ValueError, match=f"was generated with data='{src.resolve()}' \\(now '{other.resolve()}'\\)"):
        augment(model_dir, other, "train", out, cfg)
    assert augment(model_dir, src, "train", out, cfg)["rows"] == 1  # the same source and split resume


def test_augment_shards_sample_what_a_whole_run_samples(model_dir, tmp_path):
    """Random streams are keyed by row id: shards, other batch sizes and resumes all agree."""
    import readers
    from augment import augment
    rows = readers.read_emotion(emotion_file(tmp_path, 10), "train")
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5)
    summary = augment(model_dir, None, "train", tmp_path / "whole.jsonl", cfg, batch_size=4, rows=rows)
    whole, _ = read_rows(tmp_path / "whole.jsonl")
    assert summary["rows"] == 10 and summary["tokens"] == sum(r["n_tokens"] for r in whole.values())
    for shard in (rows[:3], rows[3:]):
        augment(model_dir, None, "train", tmp_path / "shards.jsonl", cfg, batch_size=3, rows=shard)
    assert read_rows(tmp_path / "shards.jsonl") == read_rows(tmp_path / "whole.jsonl")
    augmented = readers.read_augmented(tmp_path / "whole.jsonl", skip_bad=True)  # empty replies are bad rows there
    assert len(augmented) + augmented.skipped == 10 and augmented.skipped == summary["empty"]
