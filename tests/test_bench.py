"""bench/bench.py smoke test: a tiny config and a one-point grid, run end to end (including the four
training subprocesses, most of its ~15 s); the JSON must hold every figure with both sides and a
ratio. No timing is asserted."""
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # as running bench/bench.py puts it first
import bench  # noqa: E402  (bench/bench.py, which imports measure.py beside it)
from tiny import CONFIG_JSON  # noqa: E402


def test_grid_points_cross_and_full():
    args = bench.parse_args(["--grid-seqs", "128,512,2048", "--grid-batches", "1,8,32"])
    assert bench.grid_points(args) == [(1, 128), (1, 512), (1, 2048), (8, 128), (32, 128)]
    args = bench.parse_args(["--grid-seqs", "128,512", "--grid-batches", "1,8", "--full"])
    assert bench.grid_points(args) == [(1, 128), (1, 512), (8, 128), (8, 512)]


def test_bench_writes_every_figure(tmp_path, capsys, fresh_dynamo):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG_JSON))
    out = tmp_path / "bench.json"
    bench.main(["--config", str(tmp_path / "config.json"), "--threads", "1", "--reps", "1", "--warmup", "1",
                "--train-reps", "1", "--train-warmup", "1",
                "--batch", "2", "--seq", "16", "--prompt-len", "8", "--new-tokens", "3",
                "--stage2-rows", "3", "--stage2-batch", "2", "--stage2-new-tokens", "3",
                "--grid-seqs", "16", "--grid-batches", "2", "--compile-train", "--out", str(out)])
    result = json.loads(out.read_text())

    found = {(f["section"], f["figure"], f["batch"], f.get("seq"), f.get("ckpt")) for f in result["figures"]}
    expected = {("headline", "train", 2, 16, False), ("headline", "train", 2, 16, True),
                ("headline", "train_mem", 2, 16, False), ("headline", "train_mem", 2, 16, True),
                ("headline", "prefill", 2, 16, None), ("headline", "decode", 1, 8, None),
                ("headline", "decode", 32, 8, None), ("headline", "decode_compiled", 1, 8, None),
                ("headline", "stage2", 2, None, None)}
    expected |= {("grid", "train", 2, 16, False), ("grid", "train_mem", 2, 16, False),  # the headline's
                 ("grid", "prefill", 2, 16, None), ("grid", "decode", 2, 16, None)}       # measurements, reused
    assert found == expected
    for f in result["figures"]:
        assert f["ours"] > 0 and f["transformers"] > 0, f
        assert math.isfinite(f["ratio"]) and f["ratio"] > 0, f
        assert len(f["reps"]["ours"]) == len(f["reps"]["transformers"]) == 1  # --reps 1: the ratio is theirs
        assert math.isclose(f["ratio"], f["ours"] / f["transformers"]), f
    train = next(f for f in result["figures"] if f["figure"] == "train")
    assert math.isclose(train["first_loss"]["ours"], train["first_loss"]["transformers"], rel_tol=1e-4)
    assert all(f["limit"] > 0 for f in result["figures"] if f["figure"].startswith("decode") and f["batch"] == 1)
    stage2 = next(f for f in result["figures"] if f["figure"] == "stage2")
    assert stage2["tokens_produced"]["ours"] > 0 and stage2["tokens_produced"]["transformers"] > 0

    meta = result["meta"]
    assert meta["max_abs_logit_diff"] < 1e-4 and meta["transformers_attention"] == "sdpa" and meta["compile_train"]
    assert meta["machine"]["threads"] == 1 and meta["machine"]["cpu"]
    assert set(result) == {"meta", "figures"}
    printed = capsys.readouterr().out
    assert "ours/tf" in printed and "batch-1 decode limit here" in printed and "\ntarget " not in printed


def test_precision_experiment_writes_its_curves(tmp_path, capsys):
    """bench/precision.py, shortened: three fine-tunes from the same pretrained weights, the same
    first held-out loss, curves of the same length; at lr 1e-5 round-to-nearest moves the loss
    less than stochastic rounding does. The figures themselves are the README's, not asserted."""
    import precision
    out = tmp_path / "precision.json"
    precision.main(["--pretrain-steps", "20", "--steps", "12", "--eval-every", "4", "--threads", "1",
                    "--out", str(out)])
    result = json.loads(out.read_text())
    losses = result["losses"]
    assert set(losses) == set(precision.MODES) and {len(curve) for curve in losses.values()} == {4}
    assert len({curve[0] for curve in losses.values()}) <= 2  # bf16 weights: the same start in both bf16 modes
    moved = {mode: curve[0] - curve[-1] for mode, curve in losses.items()}
    assert moved["fp32 master"] > 0 and moved["bf16 nearest"] < moved["bf16-pure"]
    assert "of fp32 master's drop" in capsys.readouterr().out


def test_precision_experiment_trains_the_demo_s_q2a_in_each_dtype(tmp_path, capsys):
    """--demo-q2a, shortened to two optimizer steps per run: the demo is built, q2a trains in each
    --dtype and is scored on the whole test split, and the accuracies are printed with intervals."""
    import precision
    out = tmp_path / "precision.json"
    precision.main(["--pretrain-steps", "2", "--steps", "2", "--eval-every", "1", "--out", str(out), "--demo-q2a",
                    "--demo-out", str(tmp_path / "demo"), "--demo-max-steps", "2"])
    runs = json.loads(out.read_text())["demo_q2a"]
    assert set(runs) == {"fp32", "bf16", "bf16-pure"}
    for dtype, run in runs.items():
        low, high = run["ci95"]
        assert run["n"] == 300 and low <= run["accuracy"] <= high, dtype
        trained = json.loads((tmp_path / "demo" / f"q2a-{dtype}" / "train_config.json").read_text())["config"]
        assert (trained["dtype"], trained["max_steps"]) == (dtype, 2)
    assert capsys.readouterr().out.count("demo q2a trained in") == 3
