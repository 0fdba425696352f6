"""torchrun on CPU (gloo, 2 ranks, real subprocesses): data-parallel training equals one process,
resumes under torchrun and on another rank count; sharded stage 2 equals one process, survives
a rank killed part-way, and resumes on another rank count.

The tiny models and data come from tiny.py (the fixtures `assets` and `model_dir`), the runs'
settings and readers from helpers.py. Every process runs torch on one thread (helpers.ONE_THREAD).
"""
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import checkpoint
import train
from helpers import ONE_THREAD, ROOT, cli_args, line_count, metrics, read_rows, run_config, start_script, wait_for
from tiny import emotion_file


def torchrun(script: str, *args, nproc: int = 2) -> subprocess.Popen:
    """`torchrun --standalone --nproc-per-node N script args` (--standalone: a free port of its
    own), in a process group of its own, which a Ctrl-C reaches as a whole."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(ROOT / script), *map(str, args)]
    return subprocess.Popen(command, cwd=ROOT, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout=120) -> str:
    output = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, output
    return output


def launch(script: str, *args, nproc: int) -> subprocess.Popen:
    """torchrun for N > 1 ranks, a plain process for 1."""
    if nproc > 1:
        return torchrun(script, *args, nproc=nproc)
    return start_script(script, *args)


# ----------------------------------------------------------------------------- training

def assert_close_runs(out, reference):
    """The same steps, epochs and lr; losses, gradient norms and validation losses within rel 1e-5;
    best/ and last/ weights within atol 1e-5 (fp32: only the order of the sums differs)."""
    ours, ref = metrics(out), metrics(reference)
    assert [(m["step"], m["epoch"], m["lr"], "val_loss" in m) for m in ours] == \
        [(m["step"], m["epoch"], m["lr"], "val_loss" in m) for m in ref]
    for a, b in zip(ours, ref):
        for key in ("loss", "grad_norm", "val_loss"):
            assert a.get(key) == pytest.approx(b.get(key), rel=1e-5), (a["step"], key)
    for name in ("last", "best"):
        a = checkpoint.load_model(Path(out) / name).state_dict()
        b = checkpoint.load_model(Path(reference) / name).state_dict()
        for key in b:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=f"{name}: {key}")


def test_two_ranks_train_what_one_process_trains_and_resume(assets, tmp_path):
    """34 examples in micro-batches of 4, 4 per step: steps of 4, 4 and 1 micro-batches per epoch,
    so ranks run 2 micro-batches each, or 1 and none (rank 1 then adds zero gradients). 12
    validation examples in 3 batches: 2 on rank 0, 1 on rank 1. Evaluated at every step.
    Ctrl-C part-way (SIGINT to torchrun and both ranks, as a terminal sends it) saves the step
    it stops at; one process resumes for 2 steps, then torchrun to the end (step 30)."""
    cfg = run_config(assets, tmp_path / "one", max_examples=34, grad_accum=4, epochs=10, eval_every=1,
                     save_every=100)
    train.train(cfg)
    assert len(metrics(cfg.out)) == 30

    two = replace(cfg, out=str(tmp_path / "two"))
    proc = torchrun("train.py", *cli_args(two))
    wait_for(lambda: (tmp_path / "two" / "metrics.jsonl").is_file() and len(metrics(two.out)) >= 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and output.count("continue with --resume") == 1, output  # only rank 0 logs
    stopped = torch.load(tmp_path / "two" / "last" / "train_state.pt", weights_only=True)["step"]
    assert stopped == len(metrics(two.out)) <= 28
    train.train(replace(two, resume=True, max_steps=stopped + 2))
    finish(torchrun("train.py", *cli_args(replace(two, resume=True))))
    config = json.loads((tmp_path / "two" / "train_config.json").read_text())
    assert config["ranks"] == 2 and config["examples_per_step"] == 16
    assert_close_runs(tmp_path / "two", cfg.out)


def test_two_ranks_train_lora_adapters_as_one_process(assets, tmp_path):
    """Only the adapters' gradients are summed over the ranks (the frozen base has none)."""
    cfg = run_config(assets, tmp_path / "one", max_examples=34, grad_accum=4, epochs=2, lr=3e-2, eval_every=1,
                     lora_rank=2, lora_targets="q_proj,down_proj")
    train.train(cfg)
    two = replace(cfg, out=str(tmp_path / "two"))
    finish(torchrun("train.py", *cli_args(two)))
    assert_close_runs(two.out, cfg.out)
    assert (tmp_path / "two" / "best-adapter" / "adapter_model.safetensors").is_file()


def test_grad_accum_must_be_shared_evenly(assets, tmp_path):
    proc = torchrun("train.py", *cli_args(run_config(assets, tmp_path, grad_accum=3)))
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "--grad-accum 3 is not a multiple of the 2 ranks" in output


# ----------------------------------------------------------------------------- stage 2

def stage2_args(model_dir, src, out):
    return ["--model", model_dir, "--data", src, "--split", "train", "--batch-size", 2,
            "--max-new-tokens", 32, "--out", out, "--labels", "sadness,joy,love,anger,fear,surprise"]  # ids in src


def child_pids(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def kill_rank_part_way(proc: subprocess.Popen, out: Path, rank: int):
    """SIGKILL one rank once both ranks have written rows; torchrun then stops the other rank
    (SIGTERM: it may die in the middle of a write) and fails."""
    parts = [out.with_name(f"{out.name}.part-{r}") for r in (0, 1)]
    wait_for(lambda: all(line_count(p) >= 2 for p in parts), proc, timeout=120)
    ranks = [pid for pid in child_pids(proc.pid) if f"RANK={rank}\0" in Path(f"/proc/{pid}/environ").read_text()]
    assert len(ranks) == 1
    os.kill(ranks[0], signal.SIGKILL)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, output


def test_sharded_stage2_equals_one_process_and_survives_a_killed_rank(model_dir, tmp_path):
    """16 rows, greedy, in batches of 2: the file of one process, of 2 ranks, and of 2 ranks with
    rank 1 killed part-way, then rerun on 2 ranks or on 1, has the same rows, each once."""
    n = 16
    src = emotion_file(tmp_path, n)
    finish(launch("augment.py", *stage2_args(model_dir, src, tmp_path / "one.jsonl"), nproc=1))
    one, count = read_rows(tmp_path / "one.jsonl")
    assert count == n and len({r["reasoning"] for r in one.values()}) > n // 2

    # greedy: the merged file has the rows of the single process
    out = tmp_path / "two.jsonl"
    output = finish(torchrun("augment.py", *stage2_args(model_dir, src, out)))
    assert read_rows(out) == (one, n) and not list(tmp_path.glob("*.part-*"))
    assert f"wrote {n} rows" in output and output.count("augment: wrote") == 1  # rank 0 sums up for all

    # a rank killed part-way; a rerun on 2 ranks, or on 1, loses and duplicates nothing
    for rerun_ranks in (2, 1):
        out = tmp_path / f"killed-then-{rerun_ranks}.jsonl"
        kill_rank_part_way(torchrun("augment.py", *stage2_args(model_dir, src, out)), out, rank=1)
        parts = list(tmp_path.glob(f"{out.name}.part-*"))
        written = sum(line_count(p) for p in parts)  # complete lines: a last one may be torn
        assert len(parts) == 2 and not out.exists() and 4 <= written < n
        output = finish(launch("augment.py", *stage2_args(model_dir, src, out), nproc=rerun_ranks))
        assert f"wrote {n - written} rows" in output  # only the missing rows are generated
        assert read_rows(out) == (one, n) and not list(tmp_path.glob(f"{out.name}.part-*"))
