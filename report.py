"""The files of an evaluation: predictions.jsonl, report.json and report.md (accuracy,
macro-F1, per-class scores, the confusion matrix, the unparsed replies of both kinds, and a
few replies right and wrong), and confusion_matrix.png when matplotlib is installed.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from files import write_atomic, write_json
from metrics import COLUMNS, LABELS, UNPARSED, classification_metrics

N_EXAMPLES = 3  # replies shown in report.md, for correct and for wrong predictions


# ----------------------------------------------------------------------------- files

def write_jsonl_atomic(path, rows):
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_predictions(path) -> list[dict]:
    """Rows of a predictions.jsonl; each needs id, gold and predicted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such predictions file")
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
        missing = [key for key in ("id", "gold", "predicted") if not isinstance(row, dict) or key not in row]
        if missing:
            raise ValueError(f"{path}:{line_no}: row has no '{missing[0]}'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no predictions")
    return rows


# ----------------------------------------------------------------------------- report

def write_report(out_dir, predictions: list[dict], meta: dict, names=LABELS) -> dict:
    """Write predictions.jsonl, report.json, report.md and confusion_matrix.png (if matplotlib
    is installed) to out_dir; return the report. `predictions` rows hold id, text, gold,
    predicted, raw, n_tokens, hit_limit (the reply reached max_new_tokens); `meta` describes
    the run (task, model, data, split, scoring, wall_time_s, ...) and is copied into the report;
    names: the label set's names, in id order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = classification_metrics([p["gold"] for p in predictions], [p["predicted"] for p in predictions], names)
    generated = meta.get("scoring", "generate") == "generate"  # logprob scoring generates nothing
    wall = meta.get("wall_time_s")
    unparsed = [p for p in predictions if p["predicted"] == UNPARSED]
    report = {
        **meta,
        **metrics,
        # Unparsed replies of two kinds: cut off by the budget, or ended without an answer line.
        "hit_limit": sum(bool(p.get("hit_limit")) for p in predictions) if generated else None,
        "unparsed_cut_off": sum(bool(p.get("hit_limit")) for p in unparsed),
        "unparsed_no_answer": sum(not p.get("hit_limit") for p in unparsed),
        "mean_new_tokens": float(np.mean([p["n_tokens"] for p in predictions])) if generated else None,
        "rows_per_s": len(predictions) / wall if wall else None,
    }
    write_jsonl_atomic(out_dir / "predictions.jsonl", predictions)
    write_json(out_dir / "report.json", report)
    matrix = metrics["confusion_matrix"]
    png = plot_confusion(out_dir / "confusion_matrix.png", matrix["counts"], matrix["rows"], matrix["columns"])
    write_atomic(out_dir / "report.md", render_markdown(report, predictions, png))
    return report


def plot_confusion(path, counts, rows=LABELS, columns=COLUMNS) -> bool:
    """Draw the confusion matrix to a PNG; False when matplotlib is not installed. Past 10
    columns the figure grows with them and its text shrinks, so 20 or 50 labels stay readable."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    # A bare Figure on the Agg canvas: no display needed, and pyplot's global backend untouched.
    n = len(columns)
    fig = Figure(figsize=(7, 5.5) if n <= 10 else (2.5 + 0.45 * n, 2 + 0.4 * n), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(counts, cmap="Blues")
    names = [name if len(name) <= 24 else name[:23] + "…" for name in columns]
    ax.set_xticks(range(n), names, rotation=45 if n <= 10 else 90, ha="right" if n <= 10 else "center")
    ax.set_yticks(range(len(rows)), names[:len(rows)])
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    top, size = max(max(row) for row in counts) or 1, 10 if n <= 10 else 8 if n <= 25 else 6
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=size,
                    color="white" if count > top / 2 else "black")
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return True


def plot_accuracies(path, comparison: dict, names=("q2a", "q2ra"), title: str = "") -> bool:
    """Draw the two classifiers' accuracies with their 95% intervals (a compare() result) to a
    PNG; False when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    accuracies = [100 * comparison["accuracy_a"], 100 * comparison["accuracy_b"]]
    intervals = [comparison["accuracy_ci95_a"], comparison["accuracy_ci95_b"]]
    below = [acc - 100 * lo for acc, (lo, _) in zip(accuracies, intervals)]
    above = [100 * hi - acc for acc, (_, hi) in zip(accuracies, intervals)]
    fig = Figure(figsize=(4.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(names, accuracies, yerr=[below, above], capsize=8, color=["#9db4d6", "#2f5f9e"])
    for i, acc in enumerate(accuracies):
        ax.text(i, acc / 2, f"{acc:.1f}%", ha="center", color="white", fontweight="bold")
    ax.set_ylim(0, 100)
    ax.set_ylabel("test accuracy (%), with 95% interval")
    ax.set_title(title, fontsize=9)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return True


def render_markdown(report: dict, predictions: list[dict], png: bool) -> str:
    r, matrix = report, report["confusion_matrix"]
    mean_tokens = ("n/a (logprob scoring generates nothing)" if r["mean_new_tokens"] is None
                   else f"{r['mean_new_tokens']:.1f}")
    lines = [
        f"# Evaluation: {r.get('task', '?')} on {r.get('split', '?')}",
        "",
        f"Model `{r.get('model', '?')}`, data `{r.get('data', '?')}`, scoring mode: **{scoring_text(r)}**.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| examples | {r['n']} |",
        f"| accuracy | {r['accuracy']:.4f} |",
        f"| macro-F1 | {r['macro_f1']:.4f} |",
        f"| unparsed share | {r['unparsed_share']:.2%} ({r['unparsed_cut_off']} cut off by max_new_tokens, "
        f"{r['unparsed_no_answer']} ended without an answer) |",
        f"| mean generated length (tokens) | {mean_tokens} |",
    ]
    if r.get("hit_limit") is not None:
        lines.append(f"| replies cut at max_new_tokens | {r['hit_limit']} |")
    if r.get("wall_time_s") is not None:
        lines += [f"| wall time (s) | {r['wall_time_s']:.2f} |", f"| rows/s | {r['rows_per_s']:.2f} |"]

    lines += ["", "## Per class", "", "| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for label, c in r["per_class"].items():
        lines.append(f"| {cell(label)} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |")

    lines += ["", "## Confusion matrix (rows: gold, columns: predicted)", "",
              "| gold \\ predicted | " + " | ".join(map(cell, matrix["columns"])) + " |",
              "|---" * (len(matrix["columns"]) + 1) + "|"]
    for label, row in zip(matrix["rows"], matrix["counts"]):
        lines.append(f"| {cell(label)} | " + " | ".join(map(str, row)) + " |")
    lines += ["", "![confusion matrix](confusion_matrix.png)" if png
              else "(confusion_matrix.png not written: matplotlib is not installed)"]

    for title, correct in (("Examples: correct", True), ("Examples: wrong", False)):
        chosen = [p for p in predictions if (p["predicted"] == p["gold"]) == correct][:N_EXAMPLES]
        lines += ["", f"## {title}"]
        for p in chosen:
            lines += ["", f"**id {p['id']}**: gold `{p['gold']}`, predicted `{p['predicted']}`", "",
                      "> " + " ".join(str(p.get("text", "")).split()), "", *fenced(str(p.get("raw", "")))]
        if not chosen:
            lines += ["", "(none)"]
    return "\n".join(lines) + "\n"


def scoring_text(report: dict) -> str:
    if report.get("scoring") == "logprob":
        return "logprob (highest log-probability of the six label replies; never unparsed)"
    budget, source = report.get("max_new_tokens"), report.get("max_new_tokens_from")
    return ("generate (greedy" + (f", max_new_tokens={budget}" if budget else "")
            + (f" from {source}" if source else "") + ")")


def cell(text: str) -> str:
    """A label as a markdown table cell: a "|" in it would end the cell."""
    return text.replace("|", "\\|")


def fenced(text: str, max_chars: int = 1500) -> list[str]:
    """A markdown code block around a model reply, with a fence longer than any backtick run in it."""
    text = text if len(text) <= max_chars else text[:max_chars] + " [...]"
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence, text, fence]
