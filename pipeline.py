"""The whole method, end to end, as resumable stages.

    rgen       stage 1: fine-tune the base model to write the reasoning R from question Q and answer A
    augment    stage 2: run that generator over the labelled training split, storing R for every row
    q2a        stage 3: fine-tune the base model on text -> label (the baseline)
    q2ra       stage 3: fine-tune the base model on text -> reasoning + label
    eval_q2a   stage 4: generate on the test split, parse labels, write the report
    eval_q2ra  stage 4: the same for the reasoning classifier
    compare    stage 4: paired comparison (bootstrap CI of the difference, McNemar's exact test)

Each stage writes into OUT/<stage>/ and, when it finishes, a marker OUT/<stage>/stage.json with
the settings it ran with and the run ids of the stages it read from. A rerun skips every
finished stage; an interrupted stage resumes (training from its last checkpoint, augmentation
from its last written row); a stage whose inputs were redone runs again; a finished stage
whose settings differ from this run's is refused, so results are never silently mixed.

    python pipeline.py --demo                # the four stages on CPU in minutes, nothing downloaded
    python pipeline.py --out runs/paper      # the real thing (Llama-3.2-1B-Instruct, one GPU)
    python pipeline.py --data my_data --out runs/mine   # your own labelled set (README: "Your own data")

The label set is resolved once from --data and the label flags (labelset.py), and every split is
read with it before any stage runs, so that bad data stops the pipeline before it writes anything.
The memory flags (--dtype, --optimizer-in-backward, --lora-*, --grad-checkpointing: memory.py)
go to the two training stages, 1 and 3; stages 2 and 4 generate in bf16 (fp32 under --dtype fp32).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import augment
import eval as evaluation
import generate
import labelset
import memory
import readers
import train
from files import write_atomic, write_json
from generate import SamplingConfig
from labelset import EMOTION
from report import plot_accuracies
from runtime import one_line_errors, option, parse_config
from data import TASKS
from train import TrainConfig

PAPER = {"q2a": 0.497, "q2ra": 0.584}  # accuracies the paper reports on the test split
DEMO_OUT = "runs/demo"


# Every default that a stage has already is taken from it (TrainConfig, SamplingConfig), never copied.
TRAIN = TrainConfig


@dataclass
class PipelineConfig(labelset.LabelFlags, memory.MemoryFlags):  # the memory flags go to stages 1 and 3
    out: str = option("runs/paper", "folder holding every stage's output")
    base_model: str = option(TRAIN.model, "checkpoint folder or hub id every model starts from")
    rgen_data: str = option("syvai/reasoning-gen", "stage-1 data: folder or hub id")
    rgen_columns: str = option(TRAIN.rgen_columns, "stage-1 columns whose names are none of the known aliases: "
                               "question=COL,answer=COL,reasoning=COL")
    data: str = option("dair-ai/emotion", "the labelled text set: a folder (train and test splits, a validation "
                       "split optional) in the hub's layouts, or a hub id")
    skip_bad: bool = option(False, "skip (and count) the data's bad rows, such as a test row whose label is not in "
                            "the label set, instead of stopping at the first one")
    rgen_examples: int = option(20_000, "stage-1 subset of reasoning-gen rows")
    rgen_epochs: float = option(1.0, "stage-1 epochs")
    rgen_max_seq_len: int = option(TASKS["rgen"].max_seq_len, "stage-1 token limit per example")
    cls_epochs: float = option(TRAIN.epochs, "stage-3 epochs (q2a and q2ra alike)")
    cls_max_seq_len: int = option(TASKS["q2ra"].max_seq_len, "stage-3 token limit per example")
    val_examples: int = option(TRAIN.val_examples, "stage-3 validation rows (the lowest ids of the split), "
                               "for the validation loss that picks best/; stage 2 writes their reasoning too")
    lr: float = option(TRAIN.lr, "peak learning rate of every fine-tune")
    batch_size: int = option(TRAIN.batch_size, "examples per micro-batch")
    grad_accum: int = option(TRAIN.grad_accum, "micro-batches per optimizer step")
    augment_max_new_tokens: int = option(SamplingConfig.max_new_tokens, "stage-2 reasoning length cap")
    gen_batch_size: int = option(128, "rows per generation batch (stages 2 and 4)")
    eval_limit: int = option(0, "evaluate on the first N test rows (0: all 2,000)")
    eval_max_new_tokens: int = option(0, "stage-4 reply budget (0: each checkpoint's own, which covers its "
                                      "longest training reply: for q2ra the stage-2 cap plus the answer line)")
    device: str = option(TRAIN.device, "cuda or cpu (default: cuda when available)")
    compile: bool = option(False, "torch.compile the training blocks and the decode step of stages 2 and 4 "
                           "(for a GPU; results agree to float rounding)")
    seed: int = option(TRAIN.seed, "seed of every stage")
    demo: bool = option(False, "run the embedded CPU demo: a tiny model and a generated world, no download; "
                        "the demo sets the other options, except those given on the command line")
    demo_rows: int = option(600, "demo: emotion training rows generated (the stage-1 corpus has twice as many)")


# ----------------------------------------------------------------------------- stages

def stage_specs(cfg: PipelineConfig, out: Path) -> list[dict]:
    """Each stage: name, the stages it reads from, the settings that define its output, and a runner."""
    # Recomputing activations changes results only by float rounding: passed to training (run_train), not a setting.
    fitting = {name: getattr(cfg, name) for name in memory.FLAGS if name != "grad_checkpointing"}
    train_common = dict(model=cfg.base_model, lr=cfg.lr, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                        seed=cfg.seed, **fitting)
    if cfg.optimizer_in_backward:  # no global gradient norm exists to clip by
        train_common["grad_clip"] = 0.0
    generation_dtype = "fp32" if cfg.dtype == "fp32" else "bf16"
    augmented = out / "augment" / "train.jsonl"
    augmented_val = out / "augment" / "validation.jsonl"
    labels = {name: getattr(cfg, name) for name in labelset.FLAGS}  # every stage resolves the same label set
    return [
        dict(name="rgen", inputs=[], run=run_train,
             settings=dict(train_common, task="rgen", data=cfg.rgen_data, rgen_columns=cfg.rgen_columns,
                           max_examples=cfg.rgen_examples, epochs=cfg.rgen_epochs, max_seq_len=cfg.rgen_max_seq_len)),
        # The training split, and the validation rows that q2ra checks its loss on.
        dict(name="augment", inputs=["rgen"], run=run_augment,
             settings=dict(model=str(out / "rgen" / "best"), data=cfg.data,
                           max_new_tokens=cfg.augment_max_new_tokens, dtype=generation_dtype, seed=cfg.seed,
                           train_out=str(augmented), validation_out=str(augmented_val),
                           validation_rows=cfg.val_examples, skip_bad=cfg.skip_bad, **labels)),
        dict(name="q2a", inputs=[], run=run_train,
             settings=dict(train_common, task="q2a", data=cfg.data, epochs=cfg.cls_epochs,
                           max_seq_len=cfg.cls_max_seq_len, val_examples=cfg.val_examples, skip_bad=cfg.skip_bad,
                           **labels)),
        dict(name="q2ra", inputs=["augment"], run=run_train,
             # skip_bad: a reasoning the generator left empty is dropped (and counted), not fatal
             # Both classifiers train on every training row and validate on the same validation rows.
             settings=dict(train_common, task="q2ra", data=str(augmented), val_data=str(augmented_val),
                           val_examples=cfg.val_examples, skip_bad=True, epochs=cfg.cls_epochs,
                           max_seq_len=cfg.cls_max_seq_len, **labels)),
        dict(name="eval_q2a", inputs=["q2a"], run=run_eval,
             settings=dict(model=str(out / "q2a" / "best"), task="q2a", data=cfg.data, split="test",
                           limit=cfg.eval_limit or None, max_new_tokens=cfg.eval_max_new_tokens or None,
                           dtype=generation_dtype, skip_bad=cfg.skip_bad, **labels)),
        dict(name="eval_q2ra", inputs=["q2ra"], run=run_eval,
             settings=dict(model=str(out / "q2ra" / "best"), task="q2ra", data=cfg.data, split="test",
                           limit=cfg.eval_limit or None, max_new_tokens=cfg.eval_max_new_tokens or None,
                           dtype=generation_dtype, skip_bad=cfg.skip_bad, **labels)),
        dict(name="compare", inputs=["eval_q2a", "eval_q2ra"], run=run_compare,
             settings=dict(a=str(out / "eval_q2a" / "predictions.jsonl"),
                           b=str(out / "eval_q2ra" / "predictions.jsonl"))),
    ]


def run_train(settings: dict, folder: Path, cfg: PipelineConfig):
    # An interrupted run continues (also one stopped between the two renames of a save: train.recover_last).
    resume = (folder / "last" / "train_state.pt").is_file() or any(folder.glob(".last.old-*/train_state.pt"))
    if settings.get("val_data") and not Path(settings["val_data"]).is_file():
        # The data has no validation split, so stage 2 wrote none: q2ra holds out training rows, as q2a does.
        settings = {**settings, "val_data": ""}
    train.train(train.TrainConfig(**settings, out=str(folder), device=cfg.device, compile=cfg.compile,
                                  grad_checkpointing=cfg.grad_checkpointing, resume=resume))


def run_augment(settings: dict, folder: Path, cfg: PipelineConfig):
    sampling = generate.SamplingConfig(max_new_tokens=settings["max_new_tokens"], seed=settings["seed"])
    labels = labelset.from_flags(settings["data"], cfg, settings["skip_bad"])
    for split, limit in (("train", None), ("validation", settings["validation_rows"])):
        if split == "validation" and not has_split(settings["data"], split):
            continue  # q2a and q2ra then hold out training rows for their validation loss
        augment.augment(settings["model"], settings["data"], split, settings[f"{split}_out"], sampling,
                         batch_size=cfg.gen_batch_size, limit=limit, device=cfg.device,
                         dtype=settings["dtype"], compile=cfg.compile, labels=labels, skip_bad=settings["skip_bad"])


def has_split(source, split: str) -> bool:
    try:
        readers.source_files(source, split)
    except FileNotFoundError:
        return False
    return True


def run_eval(settings: dict, folder: Path, cfg: PipelineConfig) -> dict:
    """Returns the reply budget it used, for the stage marker."""
    report = evaluation.evaluate(settings["model"], settings["task"], settings["data"], split=settings["split"],
                                 out_dir=folder, limit=settings["limit"], batch_size=cfg.gen_batch_size,
                                 max_new_tokens=settings["max_new_tokens"], device=cfg.device,
                                 dtype=settings["dtype"], compile=cfg.compile, skip_bad=settings["skip_bad"])
    # (the label set is the one the checkpoint records: training resolved it from the same flags)
    return {k: report[k] for k in ("max_new_tokens", "max_new_tokens_from")}


def run_compare(settings: dict, folder: Path, cfg: PipelineConfig):
    result = evaluation.compare(settings["a"], settings["b"])
    write_json(folder / "compare.json", result)


# ----------------------------------------------------------------------------- the stage runner

def run_pipeline(cfg: PipelineConfig) -> dict:
    out = Path(cfg.out)
    if cfg.demo:
        import demo
        if cfg.base_model != demo.settings(out, cfg.demo_rows, cfg.seed)["base_model"]:
            raise ValueError("a demo run takes the demo's settings: build it with pipeline.demo_config()")
        out.mkdir(parents=True, exist_ok=True)
        demo.prepare(out, cfg.demo_rows, cfg.seed)
    check_data(cfg)  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    run_ids = {}
    for spec in stage_specs(cfg, out):
        name, folder = spec["name"], out / spec["name"]
        inputs = {dep: run_ids[dep] for dep in spec["inputs"]}
        recorded = portable(spec["settings"], out)
        marker = read_marker(folder)
        if marker is not None and marker["settings"] != recorded:
            changed = sorted(k for k in recorded.keys() | marker["settings"].keys()
                             if recorded.get(k) != marker["settings"].get(k))
            raise SystemExit(f"{folder} was made with other settings ({', '.join(changed)}): "
                             f"use another --out, or delete {folder} to redo it")
        if marker is not None and marker["inputs"] == inputs:
            print(f"[{name}] done already, skipped")
            run_ids[name] = marker["run_id"]
            continue
        if marker is not None:  # an input was redone after this stage ran: its output is stale
            print(f"[{name}] its inputs were redone: running it again")
            shutil.rmtree(folder)
        print(f"[{name}] running")
        folder.mkdir(parents=True, exist_ok=True)
        started = time.time()
        facts = spec["run"](spec["settings"], folder, cfg) or {}  # what the stage chose for itself
        run_ids[name] = uuid.uuid4().hex
        write_marker(folder, dict(settings=recorded, inputs=inputs, run_id=run_ids[name],
                                  seconds=round(time.time() - started, 1), **portable(facts, out)))
    summary = summarize(out, cfg)
    print(summary["markdown"])
    return summary


def check_data(cfg: PipelineConfig) -> labelset.LabelSet:
    """The label set, and every split read with it, before any stage runs: data that cannot be
    used (integer ids without names, one label, an unknown label in the test split, an empty text)
    stops the pipeline with one line, before hours of training are spent on it."""
    labels = labelset.from_flags(cfg.data, cfg, cfg.skip_bad)
    for split in readers.SPLITS:
        if split != "validation" or has_split(cfg.data, split):  # the one split a data set may lack
            readers.read_labelled(cfg.data, split, labels.names, labels.text_column, labels.label_column, cfg.skip_bad)
    return labels


def demo_config(out: str = DEMO_OUT, demo_rows: int = PipelineConfig.demo_rows, seed: int = PipelineConfig.seed,
                **changes) -> PipelineConfig:
    """The demo's configuration: the demo's settings in place of the defaults, then `changes`."""
    import demo
    return PipelineConfig(**{**demo.settings(out, demo_rows, seed), **changes},
                          out=out, demo=True, demo_rows=demo_rows, seed=seed)


def portable(settings: dict, out: Path) -> dict:
    """Settings as a marker records them: JSON types, paths inside OUT written as $OUT/...,
    so a run folder can be moved or copied and still be recognised."""
    prefix = str(out) + "/"
    return {k: "$OUT/" + v.removeprefix(prefix) if isinstance(v, str) and v.startswith(prefix) else v
            for k, v in json.loads(json.dumps(settings)).items()}


def read_marker(folder: Path) -> dict | None:
    path = folder / "stage.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_marker(folder: Path, marker: dict):
    write_json(folder / "stage.json", marker)


def points(x: float) -> str:
    return f"{100 * x:+.1f} points"


def summarize(out: Path, cfg: PipelineConfig) -> dict:
    reports = {task: json.loads((out / f"eval_{task}" / "report.json").read_text()) for task in ("q2a", "q2ra")}
    cmp = json.loads((out / "compare" / "compare.json").read_text())
    intervals = {"q2a": cmp["accuracy_ci95_a"], "q2ra": cmp["accuracy_ci95_b"]}
    lines = []
    if cfg.demo:
        import demo
        lines += [demo.EXPLANATION, ""]
    # The paper's figures are dair-ai/emotion's: beside another label set they would mislead.
    paper = reports["q2a"].get("label_set", {}).get("names", list(EMOTION.names)) == list(EMOTION.names)
    lines += ["| classifier | accuracy (95% CI) | macro-F1 | unparsed |" + (" paper's accuracy |" if paper else ""),
              "|---|---|---|---|" + ("---|" if paper else "")]
    for task in ("q2a", "q2ra"):
        r, (lo, hi) = reports[task], intervals[task]
        lines.append(f"| {task} | {r['accuracy']:.1%} ({lo:.1%} to {hi:.1%}) | {r['macro_f1']:.1%} "
                     f"| {r['unparsed_share']:.1%} |" + (f" {PAPER[task]:.1%} |" if paper else ""))
    lo, hi = cmp["ci95"]
    f1_diff = reports["q2ra"]["macro_f1"] - reports["q2a"]["macro_f1"]
    lines.append(f"| q2ra - q2a | {points(cmp['diff'])} (95% CI {100 * lo:+.1f} to {100 * hi:+.1f}; "
                 f"McNemar exact p = {cmp['mcnemar_p']:.3g}, {cmp['n']} paired rows) | {points(f1_diff)} | "
                 f"|" + (" +8.7 points, p < .001 |" if paper else ""))
    title = f"q2ra - q2a: {points(cmp['diff'])}, McNemar p = {cmp['mcnemar_p']:.2g}" + (" (demo)" if cfg.demo else "")
    if plot_accuracies(out / "summary.png", cmp, title=title):
        lines += ["", "![accuracy of both classifiers with 95% intervals](summary.png)"]
    markdown = "\n".join(lines) + "\n"
    summary = dict(reports={t: {k: reports[t][k] for k in ("accuracy", "macro_f1", "unparsed_share")}
                            for t in reports}, compare=cmp, demo=cfg.demo, markdown=markdown)
    write_atomic(out / "summary.md", markdown)
    write_json(out / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- command line

def parse_args(argv: list[str]) -> PipelineConfig:
    """With --demo the demo's settings replace the defaults (--help then shows them); the flags
    given still win. A first pass, without --help, finds out whether --demo is given."""
    first = parse_config(PipelineConfig, [a for a in argv if a not in ("-h", "--help")], description=__doc__)
    defaults = None
    if first.demo:
        defaults = vars(demo_config(out=DEMO_OUT if first.out == PipelineConfig.out else first.out,
                                    demo_rows=first.demo_rows, seed=first.seed))
    return parse_config(PipelineConfig, argv, description=__doc__, defaults=defaults)


if __name__ == "__main__":
    cfg = parse_args(sys.argv[1:])
    with one_line_errors("pipeline.py", "interrupted; run the same command again to continue"):
        run_pipeline(cfg)
