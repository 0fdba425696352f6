"""What a reply means and how good a classifier is: the label parser, the classification
metrics, and the paired tests that compare two classifiers on the same examples.

    parse_label              a reply -> one of the label set's names, or "unparsed"
    classification_metrics   accuracy, macro-F1, per-class scores, confusion matrix, unparsed share
    mcnemar_exact            McNemar's exact test on the examples where two classifiers disagree
    bootstrap_diff_ci        the paired bootstrap 95% CI of their accuracy difference

References: McNemar 1947; Dietterich 1998, "Approximate statistical tests for comparing
supervised classification learning algorithms"; Efron & Tibshirani 1993 (the bootstrap).
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from data import LABELS  # dair-ai/emotion's names: the default label set's
from labelset import EMOTION, LabelSet

ANSWER_PREFIX = EMOTION.answer_prefix  # dair-ai/emotion's q2ra target's last line is "Emotion: <label>"
UNPARSED = "unparsed"
COLUMNS = (*LABELS, UNPARSED)  # dair-ai/emotion's confusion-matrix columns: every label, then "unparsed"

# ----------------------------------------------------------------------------- parsing


class Patterns(NamedTuple):
    label: re.Pattern    # any label as a whole word
    answer: re.Pattern   # an answer line
    by_lower: dict       # a matched name in lower case -> the label set's name


@lru_cache(maxsize=32)
def patterns(labels: LabelSet) -> Patterns:
    """The parser's patterns for a label set. Names are tried longest first and must be whole
    ("neg" is not found in "negative"); they may hold spaces and punctuation ("Sci/Tech")."""
    names = "|".join(re.escape(name) for name in sorted(labels.names, key=len, reverse=True))
    # A label as a whole word: not inside a longer word ("joyful"), but markdown, quotes and
    # punctuation around it are fine ("**joy**", "'joy'", "_joy_", "joy.").
    label = re.compile(r"(?<![^\W\d_])(" + names + r")(?![^\W\d_])", re.IGNORECASE)
    # An answer line: the prefix ("Emotion:") at the start of the line, then one label and nothing
    # else; markdown ("**Emotion:** Joy"), quotes and closing punctuation around them are fine.
    prefix = labels.answer_prefix
    head = re.escape(prefix.rstrip(":")) + (r"[*_ \t]*:" if prefix.endswith(":") else "")
    answer = re.compile(r"[*_ \t]*" + head + r"[*_ \t]*[\"'`]?(" + names + r")[\"'`]?[*_.!]*", re.IGNORECASE)
    return Patterns(label, answer, {name.lower(): name for name in labels.names})


LABEL_RE, ANSWER_RE = patterns(EMOTION)[:2]  # dair-ai/emotion's
SPECIAL_TOKEN_RE = re.compile(r"<\|[a-z_]+\|>")  # "<|eot_id|>" where a reply was decoded with special tokens


def parse_label(task: str, text: str, labels: LabelSet = EMOTION) -> str:
    """The label a reply gives (one of labels.names), or "unparsed".

    q2a: the reply must name exactly one label ("Joy", " joy.", "**joy**", "Emotion: joy");
    naming none or two different ones is unparsed.
    q2ra: only the last non-empty line counts, and it must be an answer line ("Emotion: joy"),
    whose label is the whole rest of the line. A reply cut off mid-reasoning, or one that goes on
    after its answer line, is unparsed: label words inside the reasoning are not an answer.
    """
    found = patterns(labels)
    if task == "q2a":
        names = {found.by_lower[word.lower()] for word in found.label.findall(text)}
        return names.pop() if len(names) == 1 else UNPARSED
    if task == "q2ra":
        lines = [line for line in SPECIAL_TOKEN_RE.sub("", text).splitlines() if line.strip()]
        answer = found.answer.fullmatch(lines[-1].strip()) if lines else None
        return found.by_lower[answer.group(1).lower()] if answer else UNPARSED
    raise ValueError(f"task '{task}' has no label to parse (expected q2a or q2ra)")


# ----------------------------------------------------------------------------- metrics

def confusion_matrix(gold, predicted, names=LABELS) -> list[list[int]]:
    """Counts with gold labels as rows (names order) and predictions as columns (names, then "unparsed")."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    columns = [*names, UNPARSED]
    row_of, column_of = {name: i for i, name in enumerate(names)}, {name: i for i, name in enumerate(columns)}
    counts = [[0] * len(columns) for _ in names]
    for g, p in zip(gold, predicted):
        if g not in row_of:
            raise ValueError(f"gold label '{g}' is not one of {', '.join(names)}")
        if p not in column_of:
            raise ValueError(f"predicted label '{p}' is not one of {', '.join(columns)}")
        counts[row_of[g]][column_of[p]] += 1
    return counts


def classification_metrics(gold, predicted, names=LABELS) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro-F1, confusion matrix, unparsed share.

    A class that is never predicted has precision 0, one without gold examples recall 0, and
    F1 is 0 when precision + recall is 0 (sklearn's zero_division=0). Macro-F1 is the plain
    mean over all classes of `names`, so every class weighs the same whatever its support.
    """
    counts = confusion_matrix(gold, predicted, names)
    n = len(gold)
    if n == 0:
        raise ValueError("no predictions to score")
    per_class = {}
    for i, label in enumerate(names):
        tp = counts[i][i]
        n_predicted = sum(row[i] for row in counts)
        support = sum(counts[i])
        precision = tp / n_predicted if n_predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return {
        "n": n,
        "accuracy": sum(counts[i][i] for i in range(len(names))) / n,
        "macro_f1": sum(c["f1"] for c in per_class.values()) / len(names),
        "unparsed_share": sum(row[-1] for row in counts) / n,
        "per_class": per_class,
        "confusion_matrix": {"rows": list(names), "columns": [*names, UNPARSED], "counts": counts},
    }


# ----------------------------------------------------------------------------- paired significance

def _paired(correct_a, correct_b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"paired tests need two equally long, non-empty 1-d lists "
                         f"(got shapes {a.shape} and {b.shape})")
    return a, b


def mcnemar_exact(correct_a, correct_b) -> float:
    """Two-sided exact McNemar p-value for paired per-example correctness of A and B.

    Only the discordant examples carry information: under H0 (equal accuracy) the number of
    them that A gets right is Binomial(n_discordant, 1/2). p = 2 * P(X <= min(b, c)), capped at 1.
    """
    a, b = _paired(correct_a, correct_b)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = only_a + only_b
    if n == 0:
        return 1.0
    # Exact integers: sum of C(n, k) over the tail, divided once by 2^n. Python's int / int
    # is correctly rounded, so a test set of any size neither overflows nor loses precision.
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**n)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy of correct/n. Unlike p +- z*sqrt(p(1-p)/n) it
    stays inside [0, 1] and does not shrink to nothing at 0 % or 100 %."""
    if n <= 0:
        raise ValueError(f"an accuracy interval needs at least one example (got n={n})")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_diff_ci(correct_a, correct_b, n_boot: int = 10000, seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap 95% percentile CI of accuracy(B) - accuracy(A).

    Each resample draws n examples with replacement, keeping A's and B's results on an
    example together. Per example, B - A is -1, 0 or +1, so a resample is fully described by
    how many of each it drew: a multinomial draw of three counts, which is the same
    distribution as resampling indices, vectorised over n_boot without an (n_boot, n) array.
    """
    a, b = _paired(correct_a, correct_b)
    n = len(a)
    diff = b.astype(np.int64) - a.astype(np.int64)                       # (n,) in {-1, 0, 1}
    shares = [np.sum(diff == -1) / n, np.sum(diff == 0) / n, np.sum(diff == 1) / n]
    counts = np.random.default_rng(seed).multinomial(n, shares, size=n_boot)  # (n_boot, 3)
    diffs = (counts[:, 2] - counts[:, 0]) / n                              # (n_boot,)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)
