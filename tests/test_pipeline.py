"""The pipeline end to end on the demo: every report file, the gap the demo is built to show,
skipping, reruns, refusals, and the README's commands."""
import json
import re
import shutil

import pytest

import pipeline
from helpers import ROOT, run_script
STAGES = ["rgen", "augment", "q2a", "q2ra", "eval_q2a", "eval_q2ra", "compare"]


def small_demo(out) -> pipeline.PipelineConfig:
    """The README's demo (about three minutes on two cores): smaller worlds do not show the gap."""
    return pipeline.demo_config(out=str(out))


def run(cfg, capsys) -> tuple[dict, dict[str, str]]:
    """Run the pipeline; return its summary and what each stage did (ran / skipped / redone)."""
    summary = pipeline.run_pipeline(cfg)
    printed = capsys.readouterr().out
    actions = {}
    for name, what in re.findall(r"^\[(\w+)\] (.*)$", printed, flags=re.M):
        actions[name] = "skipped" if "skipped" in what else "ran"
    return summary, actions


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One demo run shared by the tests below (each copies it before changing it)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    summary = pipeline.run_pipeline(small_demo(out))
    return out, summary


def test_demo_writes_every_report(demo_run):
    out, summary = demo_run
    for stage in STAGES:
        assert (out / stage / "stage.json").is_file(), stage
    for task in ("q2a", "q2ra"):
        for name in ("predictions.jsonl", "report.json", "report.md", "confusion_matrix.png"):
            assert (out / f"eval_{task}" / name).is_file(), (task, name)
        for name in ("best/config.json", "best/model.safetensors", "best/tokenizer.json", "metrics.jsonl"):
            assert (out / task / name).is_file(), (task, name)
        report = json.loads((out / f"eval_{task}" / "report.json").read_text())
        assert report["n"] == sum(1 for _ in open(out / f"eval_{task}" / "predictions.jsonl"))
    augmented = [json.loads(line) for line in open(out / "augment" / "train.jsonl")]
    assert len({r["id"] for r in augmented}) == len(augmented) == 600
    assert sum(1 for _ in open(out / "augment" / "validation.jsonl")) == 75  # the demo's whole validation split
    q2ra_config = json.loads((out / "q2ra" / "train_config.json").read_text())
    assert q2ra_config["train_examples"] == 600 and q2ra_config["val_examples"] == 75
    assert (out / "summary.md").is_file() and "synthetic world" in (out / "summary.md").read_text()
    assert (out / "summary.png").is_file() and "summary.png" in (out / "summary.md").read_text()
    # the q2ra reply budget: stage 2's cap plus the answer line, from the checkpoint, in the marker and report
    marker = json.loads((out / "eval_q2ra" / "stage.json").read_text())
    report = json.loads((out / "eval_q2ra" / "report.json").read_text())
    assert marker["max_new_tokens"] == report["max_new_tokens"] == q2ra_config["max_new_tokens"]
    assert q2ra_config["reasoning_tokens"] == json.loads((out / "augment" / "stage.json").read_text())["settings"]["max_new_tokens"]
    assert marker["max_new_tokens"] > q2ra_config["reasoning_tokens"]
    assert marker["max_new_tokens_from"] == "$OUT/q2ra/best/generation_config.json"
    compare = json.loads((out / "compare" / "compare.json").read_text())
    assert set(summary["compare"]) >= {"diff", "ci95", "mcnemar_p"} and compare == summary["compare"]


def test_the_demo_shows_the_gap(demo_run):
    """The demo's world is built so that reasoning helps: at the default seed q2ra beats q2a by
    at least 5 points, significantly, and each accuracy comes with its interval."""
    cmp = demo_run[1]["compare"]
    assert cmp["diff"] >= 0.05 and cmp["mcnemar_p"] < 0.05 and cmp["ci95"][0] > 0
    for side in ("a", "b"):
        lo, hi = cmp[f"accuracy_ci95_{side}"]
        assert lo < cmp[f"accuracy_{side}"] < hi


def test_rerun_skips_every_stage(demo_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(demo_run[0], out)
    before = {s: (out / s / "stage.json").read_text() for s in STAGES}
    _, actions = run(small_demo(out), capsys)
    assert actions == {s: "skipped" for s in STAGES}
    assert before == {s: (out / s / "stage.json").read_text() for s in STAGES}


def test_deleting_a_stage_reruns_it_and_what_depends_on_it(demo_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(demo_run[0], out)
    shutil.rmtree(out / "augment")
    _, actions = run(small_demo(out), capsys)
    assert actions == {"rgen": "skipped", "augment": "ran", "q2a": "skipped", "q2ra": "ran",
                       "eval_q2a": "skipped", "eval_q2ra": "ran", "compare": "ran"}


def test_other_settings_are_refused(demo_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(demo_run[0], out)
    cfg = small_demo(out)
    cfg.rgen_epochs = 2.0
    with pytest.raises(SystemExit, match=r"rgen was made with other settings \(epochs\)"):
        pipeline.run_pipeline(cfg)


def test_readme_commands_exist_and_show_help():
    readme = (ROOT / "README.md").read_text()
    scripts = set(re.findall(r"^\s*(?:torchrun [^\n]*?)?python ([\w/]+\.py)", readme, flags=re.M))
    scripts |= set(re.findall(r"torchrun [^\n]*? ([\w/]+\.py)", readme))
    assert {"pipeline.py", "train.py", "generate.py", "augment.py", "eval.py", "bench/bench.py"} <= scripts
    for script in sorted(scripts):
        assert "usage" in run_script(script, "--help").stdout, script


def test_compile_reaches_training_and_stage_2(monkeypatch, tmp_path):
    """--compile is a speed setting: it is handed to training, stage 2 and the evaluations, not
    part of any stage's settings."""
    import augment
    import labelset
    import train
    seen = {}
    monkeypatch.setattr(labelset, "from_flags", lambda *a, **kw: labelset.EMOTION)  # no download of dair-ai/emotion
    monkeypatch.setattr(pipeline, "has_split", lambda *a: True)
    monkeypatch.setattr(train, "train", lambda cfg: seen.setdefault("train", cfg.compile))
    import eval as evaluation
    monkeypatch.setattr(augment, "augment", lambda *a, **kw: seen.setdefault("augment", kw["compile"]))
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **kw: {"max_new_tokens": 1, "max_new_tokens_from": "",
                                                                  "compile": seen.setdefault("eval", kw["compile"])})
    cfg = pipeline.PipelineConfig(out=str(tmp_path), compile=True)
    specs = {spec["name"]: spec for spec in pipeline.stage_specs(cfg, tmp_path)}
    for name in ("q2a", "augment", "eval_q2ra"):
        specs[name]["run"](specs[name]["settings"], tmp_path / name, cfg)
        assert "compile" not in specs[name]["settings"]
    assert seen == {"train": True, "augment": True, "eval": True}


def test_memory_flags_reach_stages_1_and_3_and_their_settings(monkeypatch, tmp_path):
    """--dtype, --optimizer-in-backward and --lora-rank/--lora-alpha/--lora-targets change what
    training makes, so they are part of the training stages' settings (a rerun with others is
    refused); the generating stages run the bf16 checkpoints in bf16."""
    import train
    seen = []
    monkeypatch.setattr(train, "train", seen.append)
    cfg = pipeline.parse_config(pipeline.PipelineConfig, ["--out", str(tmp_path), "--dtype", "bf16-pure",
                                                          "--optimizer-in-backward", "--grad-accum", "1",
                                                          "--lora-rank", "8", "--lora-alpha", "32",
                                                          "--lora-targets", "q_proj,v_proj", "--grad-checkpointing"])
    specs = {spec["name"]: spec for spec in pipeline.stage_specs(cfg, tmp_path)}
    for name in ("rgen", "q2a", "q2ra"):
        settings = specs[name]["settings"]
        assert (settings["dtype"], settings["optimizer_in_backward"], settings["lora_rank"], settings["lora_alpha"],
                settings["lora_targets"], settings["grad_clip"]) == ("bf16-pure", True, 8, 32.0, "q_proj,v_proj", 0.0), name
        specs[name]["run"](settings, tmp_path / name, cfg)
    assert [(c.task, c.dtype, c.lora_rank, c.lora_targets, c.optimizer_in_backward, c.grad_checkpointing)
            for c in seen] == [(task, "bf16-pure", 8, "q_proj,v_proj", True, True) for task in ("rgen", "q2a", "q2ra")]
    assert "grad_checkpointing" not in specs["q2a"]["settings"]  # a memory setting: the same results
    assert specs["augment"]["settings"]["dtype"] == specs["eval_q2ra"]["settings"]["dtype"] == "bf16"


def test_demo_flags_are_defaults_that_other_flags_override(tmp_path, capsys):
    """--demo puts the demo's settings in place of the defaults, a flag given with it still wins,
    and --demo --help shows the demo's defaults (not the real pipeline's)."""
    demo = pipeline.demo_config(out=str(tmp_path))
    cfg = pipeline.parse_args(["--demo", "--out", str(tmp_path), "--cls-epochs", "3"])
    assert cfg.cls_epochs == 3.0 and cfg.rgen_epochs == demo.rgen_epochs != pipeline.PipelineConfig.rgen_epochs
    assert cfg.base_model == demo.base_model and cfg.demo
    assert pipeline.parse_args([]) == pipeline.PipelineConfig()
    for argv, epochs in ((["--demo", "--help"], demo.cls_epochs), (["--help"], pipeline.PipelineConfig.cls_epochs)):
        with pytest.raises(SystemExit):
            pipeline.parse_args(argv)
        help_text = " ".join(capsys.readouterr().out.split())
        assert f"stage-3 epochs (q2a and q2ra alike) (default: {epochs!r})" in help_text
