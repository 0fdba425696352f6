"""Stage 4: evaluate a text classifier, and compare two of them on the same examples.

A fine-tuned model answers every prompt of a labelled split greedily (q2a: the label; q2ra:
reasoning, then a last line "<answer prefix> <label>", "Emotion: <label>" for dair-ai/emotion),
each reply is parsed to one of the label set's names or "unparsed" (which counts as wrong,
never as dropped), and the run is written to out_dir:

    predictions.jsonl     one row per example: id, text, gold, predicted, raw, n_tokens
    report.json, .md      accuracy, macro-F1, per-class precision/recall/F1, confusion matrix,
                          unparsed share, generated length, speed, scoring mode, examples
    confusion_matrix.png  when matplotlib is installed

q2a can also be scored without generating (`--scoring logprob`): the model scores every label's
reply and the most likely one is the prediction, so nothing is unparsed.

The label set (labelset.LabelSet) is the one the checkpoint was trained with (train.py records
it in label_set.json); one that the flags or the data give otherwise is refused.

`--compare A B` tests two runs against each other: the paired bootstrap 95% CI of the
accuracy difference B - A and McNemar's exact test on the examples where they disagree.

The label parser, the metrics and the paired tests are metrics.py's; the model stack
(checkpoint.py, generate.py) is imported inside the functions that run a model.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import labelset
from files import write_json
from labelset import EMOTION, LabelSet
from metrics import LABELS, bootstrap_diff_ci, mcnemar_exact, parse_label, wilson_interval
from report import read_predictions, write_report
from runtime import one_line_errors, option, parse_config
from tokenizer import Tokenizer

TASKS = ("q2a", "q2ra")  # the classifiers

# ----------------------------------------------------------------------------- compare

def compare(path_a, path_b, n_boot: int = 10000, seed: int = 0) -> dict:
    """Compare two prediction files of the same examples: accuracies with their 95% Wilson
    intervals, B - A with its paired bootstrap 95% CI, and McNemar's exact p. Files whose ids or
    gold labels differ are refused."""
    rows_a, rows_b = _by_id(path_a), _by_id(path_b)
    for i in rows_a:
        if i not in rows_b:
            raise ValueError(f"{path_b}: id {i!r} of {path_a} is missing")
    for i in rows_b:
        if i not in rows_a:
            raise ValueError(f"{path_a}: id {i!r} of {path_b} is missing")
    for i, row in rows_a.items():
        if row["gold"] != rows_b[i]["gold"]:
            raise ValueError(f"id {i!r}: gold label '{row['gold']}' in {path_a} "
                             f"but '{rows_b[i]['gold']}' in {path_b}")
    ids = list(rows_a)
    correct_a = np.array([rows_a[i]["predicted"] == rows_a[i]["gold"] for i in ids])
    correct_b = np.array([rows_b[i]["predicted"] == rows_b[i]["gold"] for i in ids])
    lo, hi = bootstrap_diff_ci(correct_a, correct_b, n_boot, seed)
    return {
        "a": str(path_a), "b": str(path_b), "n": len(ids),
        "accuracy_a": float(correct_a.mean()), "accuracy_b": float(correct_b.mean()),
        "accuracy_ci95_a": list(wilson_interval(int(correct_a.sum()), len(ids))),
        "accuracy_ci95_b": list(wilson_interval(int(correct_b.sum()), len(ids))),
        "diff": float(correct_b.mean() - correct_a.mean()), "ci95": [lo, hi], "n_boot": n_boot,
        "only_a_correct": int(np.sum(correct_a & ~correct_b)),
        "only_b_correct": int(np.sum(~correct_a & correct_b)),
        "mcnemar_p": mcnemar_exact(correct_a, correct_b),
    }


def _by_id(path) -> dict:
    rows = {}
    for row in read_predictions(path):
        if row["id"] in rows:
            raise ValueError(f"{path}: id {row['id']!r} appears twice")
        rows[row["id"]] = row
    return rows


def format_comparison(c: dict) -> str:
    lo, hi = c["ci95"]
    return "\n".join([
        f"A  accuracy {c['accuracy_a']:.4f}  {c['a']}",
        f"B  accuracy {c['accuracy_b']:.4f}  {c['b']}",
        f"B - A  {c['diff']:+.4f}  (paired bootstrap 95% CI {lo:+.4f} .. {hi:+.4f}, {c['n_boot']} resamples)",
        f"McNemar exact p = {c['mcnemar_p']:.4g}  (n = {c['n']}; only A right: {c['only_a_correct']}, "
        f"only B right: {c['only_b_correct']})",
    ])


# ----------------------------------------------------------------------------- evaluate

def evaluate(model_dir, task: str, data, split: str = "test", out_dir="runs/eval", limit: int | None = None,
             batch_size: int = 32, max_new_tokens: int | None = None, scoring: str = "generate",
             device: str | None = None, dtype=None, compile: bool = False, labels: LabelSet | None = None,
             skip_bad: bool = False) -> dict:
    """Predict every example of `data`'s `split` with the model in model_dir, write
    predictions and report to out_dir, and return the report.

    scoring="generate": greedy replies of up to max_new_tokens (default: reply_budget), parsed
    with parse_label. scoring="logprob" (q2a only): the most likely label reply.
    device defaults to cuda when available; dtype (bf16, fp32, fp16 or a torch.dtype) to bf16 on cuda, fp32 on cpu.
    compile: generate with a torch.compile'd decode step (generate.compiled_decoder).
    labels: the label set (default: checkpoint_labels); skip_bad: leave out (and count, as
    skipped_bad_rows) bad rows, such as a label outside the label set, rather than stop at the first.
    Files already in out_dir (default runs/eval) are replaced.
    """
    check_arguments(task, scoring)
    import data as data_module
    import readers
    from runtime import resolve_device_dtype
    import checkpoint

    device, dtype = resolve_device_dtype(device, dtype)
    t0 = time.perf_counter()
    folder = checkpoint.resolve_checkpoint(model_dir)  # a hub id is downloaded once
    labels = checkpoint_labels(folder, labels, data)
    rows = readers.read_labelled(data, split, labels.names, labels.text_column, labels.label_column, skip_bad)
    skipped, rows = rows.skipped, rows[:limit]
    if not rows:
        raise ValueError(f"{data}: split '{split}' has no rows")
    tokenizer = Tokenizer(folder)
    model = checkpoint.load_model(folder, dtype=dtype, device=device).eval()
    conversations = [data_module.prompt_messages(task, row, labels) for row in rows]
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    if scoring == "generate":
        from generate import EAGER, SamplingConfig, compiled_decoder, generate
        decoder = compiled_decoder(device) if compile else EAGER
        budget_from = "--max-new-tokens" if max_new_tokens else None
        if not max_new_tokens:
            max_new_tokens, budget_from = reply_budget(tokenizer, task, labels)
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
        outputs = generate(model, tokenizer, conversations, cfg, batch_size=batch_size, progress=True,
                           decoder=decoder)
    else:
        max_new_tokens, budget_from = None, None
        outputs = [{"text": label, "n_tokens": 0, "hit_limit": False} for label in
                   score_labels(model, tokenizer, conversations, batch_size, labels.names)]
    wall_s = time.perf_counter() - t0

    predictions = [{"id": row["id"], "text": row["text"], "gold": row["label"],
                    "predicted": parse_label(task, out["text"], labels), "raw": out["text"],
                    "n_tokens": out["n_tokens"], "hit_limit": bool(out["hit_limit"])}
                   for row, out in zip(rows, outputs)]
    meta = {"task": task, "model": str(model_dir), "data": str(data), "split": split, "limit": limit,
            "scoring": scoring, "max_new_tokens": max_new_tokens, "max_new_tokens_from": budget_from,
            "batch_size": batch_size, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "prompt_version": getattr(data_module, "PROMPT_VERSION", None), "label_set": labels.settings(),
            "skipped_bad_rows": skipped, "load_time_s": load_s, "wall_time_s": wall_s}
    return write_report(out_dir, predictions, meta, labels.names)


def check_arguments(task: str, scoring: str):
    if task not in TASKS:
        raise ValueError(f"task '{task}' cannot be evaluated (expected q2a or q2ra)")
    if scoring not in ("generate", "logprob"):
        raise ValueError(f"scoring '{scoring}' is not generate or logprob")
    if scoring == "logprob" and task != "q2a":
        raise ValueError("logprob scoring needs replies that are just the label: q2a only, not q2ra")


def checkpoint_labels(folder: Path, labels: LabelSet | None, data) -> LabelSet:
    """The label set to evaluate with: `labels`, else the one the checkpoint records, else the
    data's (labelset.resolve). A checkpoint trained on other names or wording is refused: its
    prompts and its answer line would not be those it learnt. (The columns may differ: they are
    the data's.)"""
    path = labelset.label_set_path(folder)
    recorded = LabelSet.from_settings(json.loads(path.read_text())) if path.is_file() else None
    labels = labels or recorded or labelset.resolve(data)
    if recorded is not None:
        theirs, ours = recorded.settings(), labels.settings()
        changed = [f"{k}={ours[k]!r} (trained with {theirs[k]!r})" for k in ours
                   if k not in ("text_column", "label_column") and ours[k] != theirs[k]]
        if changed:
            raise ValueError(f"{folder}: was trained with another label set: {'; '.join(changed)}; pass the "
                             f"training run's --labels, --instruction and --answer-prefix")
    return labels


def reply_budget(tokenizer, task: str, labels: LabelSet = EMOTION) -> tuple[int, str]:
    """The default max_new_tokens and where it comes from: the checkpoint's generation_config.json,
    where train.py records the longest reply its training targets allow (for q2ra, stage 2's
    reasoning cap plus the answer line), else data.reply_budget with stage 2's default cap."""
    import data as data_module
    config = tokenizer.folder / "generation_config.json"  # the checkpoint's folder
    budget = json.loads(config.read_text()).get("max_new_tokens") if config.is_file() else None
    if budget:
        return budget, str(config)
    return data_module.reply_budget(tokenizer, task, labels=labels), f"the {task} default (data.reply_budget)"


def score_labels(model, tokenizer, conversations: list[list[dict]], batch_size: int, names=LABELS) -> list[str]:
    """q2a without generation: for each prompt, the label of `names` whose reply (the label +
    end-of-turn token) has the highest total log-probability. batch_size prompts -> batch_size
    x len(names) sequences."""
    import torch
    from tqdm import tqdm

    predicted = []
    for start in tqdm(range(0, len(conversations), batch_size), desc="logprob", unit="batch"):
        chunk = conversations[start:start + batch_size]
        # Each candidate is rendered as the full training conversation, so its reply tokens are
        # exactly the ones the model was trained to produce (incl. <|eot_id|>).
        encoded = [tokenizer.render(conv + [{"role": "assistant", "content": label}])
                   for conv in chunk for label in names]
        with torch.inference_mode():
            scores = reply_logprobs(model, encoded, tokenizer.pad_id)   # (len(chunk) * len(names),)
        best = scores.view(len(chunk), len(names)).argmax(1)           # ties: the first label
        predicted += [names[i] for i in best.tolist()]
    return predicted


def reply_logprobs(model, encoded: list[tuple[list[int], list[bool]]], pad_id: int):
    """Sum over each sequence's reply tokens of log p(token | all tokens before it), from one
    forward pass over the right-padded batch. encoded: (ids, reply_mask) pairs."""
    import torch

    n, T = len(encoded), max(len(ids) for ids, _ in encoded)
    ids = torch.full((n, T), pad_id, dtype=torch.long)
    reply = torch.zeros(n, T, dtype=torch.bool)
    for i, (seq, mask) in enumerate(encoded):
        if not any(mask):
            raise ValueError(f"candidate {i}: the rendered conversation has no reply tokens to score")
        ids[i, :len(seq)] = torch.tensor(seq)
        reply[i, :len(mask)] = torch.tensor(mask, dtype=torch.bool)
    device = model.embed_tokens.weight.device
    ids, reply = ids.to(device), reply.to(device)

    # Right padding follows every real token, so plain causal attention (no mask) is exact.
    # Token t is predicted at position t - 1; only those positions go through the output head.
    target = reply[:, 1:]                                                 # (n, T-1)
    h = model.hidden_states(ids)[:, :-1][target]                          # (R, d)
    logp = torch.log_softmax(model.lm_head(h).float(), dim=-1)           # (R, V)
    token_logp = logp.gather(1, ids[:, 1:][target][:, None]).squeeze(1)  # (R,)
    row = torch.arange(n, device=device)[:, None].expand(n, T - 1)[target]  # (R,) sequence of each token
    return torch.zeros(n, device=device).index_add_(0, row, token_logp)  # (n,)


# ----------------------------------------------------------------------------- CLI

@dataclass
class EvalFlags(labelset.LabelFlags):  # without label flags, the checkpoint's own label set is used
    compare: list = option(None, "compare two predictions.jsonl files of the same examples (difference B - A) "
                           "instead of evaluating a model", nargs=2, metavar=("A", "B"))
    model: str = option("", "checkpoint folder (or hub id) with config.json, safetensors and tokenizer")
    task: str = option("", "q2a: label only; q2ra: reasoning, then label", choices=tuple(TASKS))
    data: str = option("", "labelled text set (dair-ai/emotion, ...): folder, file or hub id")
    split: str = option("test", "split to evaluate")
    out: str = option("", "output folder (evaluation), or JSON file for the result (--compare, optional)")
    limit: int = option(0, "evaluate only the first N rows (0: all)")
    batch_size: int = option(32, "prompts per batch")
    max_new_tokens: int = option(0, "reply budget (0: the checkpoint's generation_config.json max_new_tokens, "
                                 "which train.py sets to cover its longest training reply: for q2ra stage 2's "
                                 "reasoning cap plus the answer line; without one, 8 for q2a and 256 + the "
                                 "answer line for q2ra)")
    scoring: str = option("generate", "generate: parse greedy replies; logprob: most likely label reply (q2a only)",
                          choices=("generate", "logprob"))
    device: str = option("", "cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    dtype: str = option("", "model weights and compute (default: bf16 on cuda, fp32 on cpu)",
                        choices=("bf16", "fp32", "fp16"))
    compile: bool = option(False, "torch.compile the decode step (for a GPU)")
    skip_bad: bool = option(False, "skip (and count) rows whose label is not in the label set, or whose text is empty")


def main(argv=None):
    args = parse_config(EvalFlags, argv, "Evaluate a text classifier (q2a / q2ra), or compare two evaluation runs.\n\n"
                        "examples:\n"
                        "  python eval.py --model runs/q2ra/best --task q2ra --data dair-ai/emotion --out runs/q2ra/eval\n"
                        "  python eval.py --compare runs/q2a/eval/predictions.jsonl runs/q2ra/eval/predictions.jsonl")
    with one_line_errors("eval.py: error"):
        if args.compare:
            result = compare(*args.compare)
            print(format_comparison(result))
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                write_json(args.out, result)
            return
        missing = [flag for flag in ("model", "task", "data", "out") if not getattr(args, flag)]
        if missing:
            raise ValueError(f"--{missing[0]} is required (or use --compare A B)")
        flagged = any(getattr(args, name) != default for name, (default, _) in labelset.FLAGS.items())
        labels = labelset.from_flags(args.data, args) if flagged else None
        report = evaluate(args.model, args.task, args.data, args.split, args.out, args.limit or None, args.batch_size,
                          args.max_new_tokens or None, args.scoring, args.device or None, args.dtype or None,
                          args.compile, labels, args.skip_bad)
    print(f"accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}  "
          f"unparsed {report['unparsed_share']:.2%}  -> {Path(args.out) / 'report.md'}")


if __name__ == "__main__":
    main()
