"""What the test modules share besides the tiny world (tiny.py): our scripts run as a user runs
them, in subprocesses on one thread, and what a training run writes, read back."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# Tiny models gain nothing from threads, and when other processes keep the cores busy, OpenMP
# threads wait on each other (30x slower here). One thread also makes a subprocess's losses
# equal, bit for bit, to those of the test process (conftest.py's one_thread).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_script(script: str, *args, check=True) -> subprocess.CompletedProcess:
    """One of our scripts to its end; its failure shows its stderr."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=ONE_THREAD, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


def start_script(script: str, *args, **popen) -> subprocess.Popen:
    """One of our scripts started, to be signalled or killed; its output comes in stdout as text."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, **popen}
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=ONE_THREAD,
                            text=True, **popen)


def wait_for(condition, proc, timeout=60):
    """Until condition() holds; fails if proc ends first (showing its output, where it was kept)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before the signal:\n{proc.stdout.read() if proc.stdout else ''}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def line_count(path) -> int:
    """Complete lines in a file that a running job appends to (0 before it exists)."""
    path = Path(path)
    return path.read_text().count("\n") if path.exists() else 0


def run_config(assets, out, **kw) -> TrainConfig:
    """A few seconds of q2a training on tiny.training_assets: 48 examples, 6 optimizer steps of 4 x 2 per epoch."""
    settings = dict(task="q2a", data=str(assets.emotion), out=str(out), model=str(assets.model["llama3"]),
                    batch_size=4, grad_accum=2, epochs=5, lr=3e-3, warmup_ratio=0.1, eval_every=4, save_every=5,
                    dtype="fp32", device="cpu", seed=1, length_chunk=2)
    return TrainConfig(**{**settings, **kw})


def cli_args(cfg: TrainConfig) -> list[str]:
    """train.py's flags for cfg."""
    args = []
    for name, value in vars(cfg).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args += [flag] if value else []
        else:
            args += [flag, str(value)]
    return args


def metrics(out) -> list[dict]:
    """A training run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def trajectory(out) -> list[tuple]:
    """What must be identical between runs: everything but the timings."""
    return [(m["step"], m["epoch"], m["loss"], m["lr"], m["grad_norm"], m.get("val_loss")) for m in metrics(out)]


def read_rows(path) -> tuple[dict, int]:
    """A stage-2 jsonl: its rows by id, and how many lines it holds."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return {r["id"]: r for r in rows}, len(rows)
