"""eval.py: reply parsing, metrics against hand-computed values, paired tests, report files,
--compare, the CLI, logprob scoring on a tiny random model, and evaluate() end to end."""
import json
import math
import sys

import numpy as np
import pytest
import torch

import checkpoint
from eval import compare, evaluate, reply_logprobs, score_labels
from report import write_report
from metrics import (COLUMNS, LABELS, UNPARSED, bootstrap_diff_ci, classification_metrics, confusion_matrix,
                     mcnemar_exact, parse_label)
from tokenizer import Tokenizer, build_tokenizer
from helpers import run_script
from tiny import tiny_llama


# ----------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("reply,label", [
    ("joy", "joy"), ("Joy", "joy"), (" joy.\n", "joy"), ("**joy**", "joy"), ("Emotion: joy", "joy"),
    ('"Sadness"', "sadness"), ("'fear'!", "fear"), ("SURPRISE", "surprise"), ("_love_", "love"),
    ("anger<|eot_id|>", "anger"), ("joy, joy", "joy"),               # the same label twice is one answer
    ("joy or sadness", UNPARSED), ("Emotion: love\nanger", UNPARSED),  # two different labels
    ("", UNPARSED), ("happy", UNPARSED), ("joyful", UNPARSED), ("fearless", UNPARSED),  # none
])
def test_parse_q2a(reply, label):
    assert parse_label("q2a", reply) == label


@pytest.mark.parametrize("reply,label", [
    ("The writer lost a friend and misses them.\nEmotion: sadness", "sadness"),
    ("They got the job!\nemotion: Joy.", "joy"),
    ("Reasoning.\n**Emotion:** joy", "joy"),
    ("Reasoning.\nEMOTION : fear\n", "fear"),
    ("Reasoning.\nEmotion: \"surprise\"<|eot_id|>", "surprise"),
    ("Not sadness, it is rage.\nEmotion: anger", "anger"),           # words in the reasoning don't count
    ("Draft: Emotion: joy\nOn reflection...\nEmotion: fear", "fear"),  # the last answer wins
    ("The text shows joy and love.", UNPARSED),                       # no answer line: never guessed
    ("The author feels", UNPARSED),                                   # cut off by max_new_tokens
    ("Reasoning.\nEmotion: unclear", UNPARSED),
    ("Reasoning.\nEmotion: joy or love", UNPARSED),
    ("Emotion: joy\nOn reflection...\nEmotion:", UNPARSED),           # last answer is empty
    ("Reasoning.\nEmotion:\njoy", UNPARSED),                          # label must be on the answer line
    ("", UNPARSED),
    # only the last non-empty line, anchored at its start (issue 11)
    ("...\nEmotion: sadness", "sadness"), ("...\n**Emotion:** Joy!", "joy"), ("Emotion: anger\nEmotion: fear", "fear"),
    ("Reasoning.\nEmotion: joy\n\n", "joy"),
    ("The emotion: sadness is shown by the first clause\nmore reasoning that was cut off", UNPARSED),
    ("He felt no emotion: he was calm. This suggests sadness", UNPARSED),
    ("Reasoning.\nEmotion: joy.\nThus the answer is fear", UNPARSED),
    ("Reasoning.\nEmotion: joy, because she smiled", UNPARSED), ("Reasoning.\nEmotion: joyful", UNPARSED),
])
def test_parse_q2ra(reply, label):
    assert parse_label("q2ra", reply) == label


def test_parse_unknown_task():
    with pytest.raises(ValueError, match="rgen"):
        parse_label("rgen", "joy")


def test_labels_match_data_module():
    import data
    import metrics
    assert LABELS is data.LABELS and list(LABELS) == ["sadness", "joy", "love", "anger", "fear", "surprise"]
    assert metrics.ANSWER_PREFIX == data.ANSWER_PREFIX == "Emotion:"


# ----------------------------------------------------------------------------- metrics

GOLD = ["sadness", "sadness", "sadness", "joy", "joy", "love", "anger", "fear"]
PRED = ["sadness", "sadness", "joy", "joy", UNPARSED, "joy", "anger", "sadness"]
# By hand. Confusion (rows gold; columns sadness joy love anger fear surprise unparsed):
#   sadness  2 1 0 0 0 0 0      joy  0 1 0 0 0 0 1      love 0 1 0 0 0 0 0
#   anger    0 0 0 1 0 0 0      fear 1 0 0 0 0 0 0      surprise (no rows)
# accuracy = 4 correct / 8 = 0.5; unparsed share = 1/8
# sadness: TP 2, predicted 3 (2 + fear's), support 3 -> P 2/3, R 2/3, F1 2/3
# joy:     TP 1, predicted 3, support 2                -> P 1/3, R 1/2, F1 (2*1/6)/(5/6) = 2/5
# love:    TP 0, never predicted, support 1            -> P 0 (defined), R 0, F1 0
# anger:   TP 1, predicted 1, support 1                -> 1, 1, 1
# fear:    TP 0, never predicted, support 1            -> 0, 0, 0
# surprise: no predictions, no support                 -> 0, 0, 0
# macro-F1 = (2/3 + 2/5 + 0 + 1 + 0 + 0) / 6 = (31/15) / 6 = 31/90
EXPECTED_CM = [[2, 1, 0, 0, 0, 0, 0],
               [0, 1, 0, 0, 0, 0, 1],
               [0, 1, 0, 0, 0, 0, 0],
               [0, 0, 0, 1, 0, 0, 0],
               [1, 0, 0, 0, 0, 0, 0],
               [0, 0, 0, 0, 0, 0, 0]]
EXPECTED_PRF = {"sadness": (2 / 3, 2 / 3, 2 / 3, 3), "joy": (1 / 3, 1 / 2, 2 / 5, 2), "love": (0, 0, 0, 1),
                "anger": (1, 1, 1, 1), "fear": (0, 0, 0, 1), "surprise": (0, 0, 0, 0)}


def test_metrics_by_hand():
    assert confusion_matrix(GOLD, PRED) == EXPECTED_CM
    m = classification_metrics(GOLD, PRED)
    assert m["n"] == 8
    assert m["accuracy"] == 0.5
    assert m["unparsed_share"] == 1 / 8
    assert m["macro_f1"] == pytest.approx(31 / 90)
    assert m["confusion_matrix"] == {"rows": list(LABELS), "columns": list(COLUMNS), "counts": EXPECTED_CM}
    for label, (p, r, f1, support) in EXPECTED_PRF.items():
        got = m["per_class"][label]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f1)), label
        assert got["support"] == support


def test_metrics_reject_bad_labels():
    with pytest.raises(ValueError, match="gold label 'happy'"):
        classification_metrics(["happy"], ["joy"])
    with pytest.raises(ValueError, match="predicted label 'happy'"):
        classification_metrics(["joy"], ["happy"])
    with pytest.raises(ValueError, match="2 gold labels but 1"):
        confusion_matrix(["joy", "joy"], ["joy"])
    with pytest.raises(ValueError, match="no predictions"):
        classification_metrics([], [])


# ----------------------------------------------------------------------------- paired tests

def pairs(only_a, only_b, both=3, neither=2):
    """Correctness vectors with the given numbers of discordant and concordant examples."""
    a = [1] * only_a + [0] * only_b + [1] * both + [0] * neither
    b = [0] * only_a + [1] * only_b + [1] * both + [0] * neither
    return a, b


@pytest.mark.parametrize("only_a,only_b,p", [
    (0, 5, 0.0625),                         # 2 * C(5,0) / 2^5
    (5, 0, 0.0625),                         # symmetric
    (1, 9, 0.021484375),                    # 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024
    (2, 8, 0.109375),                       # 2 * (1 + 10 + 45) / 1024 = 112 / 1024
    (4, 4, 1.0), (7, 6, 1.0),               # 2 * P(X <= n/2) >= 1: capped
    (0, 0, 1.0),                            # no discordant pairs
])
def test_mcnemar_exact_known_cases(only_a, only_b, p):
    assert mcnemar_exact(*pairs(only_a, only_b)) == pytest.approx(p, rel=1e-12)


def test_mcnemar_exact_large_counts_stay_finite():
    p = mcnemar_exact(*pairs(300, 700))     # 2^1000 overflows a float; the integer sum does not
    assert 0 < p < 1e-30
    assert math.isfinite(p)


def test_mcnemar_exact_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for only_a, only_b in [(0, 5), (1, 9), (3, 17), (40, 66), (123, 150), (500, 520)]:
        expected = stats.binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue
        assert mcnemar_exact(*pairs(only_a, only_b)) == pytest.approx(expected, rel=1e-9)


def simulated(n=2000, seed=1):
    """A at 60% and B at 70% accuracy, correlated: the true difference is +0.10."""
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    return u < 0.6, u < 0.7


def test_bootstrap_ci_covers_and_is_reproducible():
    a, b = simulated()
    lo, hi = bootstrap_diff_ci(a, b, n_boot=10000, seed=0)
    observed = b.mean() - a.mean()
    assert lo < observed < hi
    assert lo < 0.10 < hi
    assert 0.01 < hi - lo < 0.04           # about 2 * 1.96 * sqrt(0.1 * 0.9 / 2000) = 0.026
    assert bootstrap_diff_ci(a, b, n_boot=10000, seed=0) == (lo, hi)
    assert bootstrap_diff_ci(a, b, n_boot=10000, seed=1) != (lo, hi)


def test_bootstrap_matches_index_resampling():
    """The multinomial shortcut has the distribution of resampling example indices."""
    a, b = simulated(n=500, seed=2)
    idx = np.random.default_rng(5).integers(0, 500, size=(4000, 500))
    naive = np.percentile(b[idx].mean(1) - a[idx].mean(1), [2.5, 97.5])
    assert np.allclose(bootstrap_diff_ci(a, b, n_boot=4000, seed=3), naive, atol=0.006)


def test_bootstrap_identical_predictions():
    a = [1, 0, 1, 1, 0]
    assert bootstrap_diff_ci(a, a) == (0.0, 0.0)


def test_paired_inputs_checked():
    with pytest.raises(ValueError, match="equally long"):
        mcnemar_exact([1, 0], [1])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_diff_ci([], [])


# ----------------------------------------------------------------------------- report

def fixture_predictions():
    return [{"id": i, "text": f"example text {i}", "gold": g, "predicted": p,
             "raw": f"Reasoning {i}.\nEmotion: {p}", "n_tokens": 10 + i, "hit_limit": i == 4}
            for i, (g, p) in enumerate(zip(GOLD, PRED))]


META = {"task": "q2ra", "model": "m", "data": "d", "split": "test", "scoring": "generate",
        "max_new_tokens": 256, "wall_time_s": 2.0}


def test_write_report(tmp_path):
    report = write_report(tmp_path / "out", fixture_predictions(), META)
    out = tmp_path / "out"
    names = {"predictions.jsonl", "report.json", "report.md", "confusion_matrix.png"}
    has_mpl = True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        has_mpl, names = False, names - {"confusion_matrix.png"}
    assert {f.name for f in out.iterdir()} == names  # no temporary files left behind

    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["accuracy"] == 0.5 and saved["macro_f1"] == pytest.approx(31 / 90)
    assert saved["unparsed_share"] == 0.125 and saved["confusion_matrix"]["counts"] == EXPECTED_CM
    assert saved["mean_new_tokens"] == 13.5          # mean of 10..17
    assert saved["rows_per_s"] == 4.0                # 8 rows in 2 s
    assert saved["task"] == "q2ra" and saved["scoring"] == "generate"
    assert saved["hit_limit"] == 1 and saved["unparsed_cut_off"] == 1 and saved["unparsed_no_answer"] == 0

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert rows == fixture_predictions()

    md = (out / "report.md").read_text()
    for fragment in ["| accuracy | 0.5000 |", "| macro-F1 | 0.3444 |", "| unparsed share | 12.50% (1 cut off by max_new_tokens, 0 ended without an answer) |",
                     "| mean generated length (tokens) | 13.5 |", "| rows/s | 4.00 |", "greedy, max_new_tokens=256",
                     "| joy | 0.3333 | 0.5000 | 0.4000 | 2 |",
                     "| gold \\ predicted | sadness | joy | love | anger | fear | surprise | unparsed |",
                     "| sadness | 2 | 1 | 0 | 0 | 0 | 0 | 0 |", "| joy | 0 | 1 | 0 | 0 | 0 | 0 | 1 |",
                     "## Examples: correct", "## Examples: wrong", "Reasoning 2.\nEmotion: joy"]:
        assert fragment in md, fragment
    if has_mpl:
        assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "![confusion matrix](confusion_matrix.png)" in md


def test_write_report_without_matplotlib(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)   # makes `import` raise ImportError
    write_report(tmp_path, fixture_predictions(), {**META, "scoring": "logprob"})
    assert not (tmp_path / "confusion_matrix.png").exists()
    md = (tmp_path / "report.md").read_text()
    assert "matplotlib is not installed" in md
    assert "logprob" in md and "n/a" in md
    assert json.loads((tmp_path / "report.json").read_text())["mean_new_tokens"] is None


# ----------------------------------------------------------------------------- compare

def write_predictions(path, gold, predicted, ids=None):
    ids = ids if ids is not None else [f"r{i}" for i in range(len(gold))]
    path.write_text("".join(json.dumps({"id": i, "text": "t", "gold": g, "predicted": p, "raw": p, "n_tokens": 1})
                            + "\n" for i, g, p in zip(ids, gold, predicted)))
    return path


def test_compare(tmp_path):
    gold = ["joy"] * 20
    a = write_predictions(tmp_path / "a.jsonl", gold, ["joy"] * 10 + ["fear"] * 10)             # 50%
    # B: the same rows in reverse order, right on all of A's right ones and 5 more.
    b = write_predictions(tmp_path / "b.jsonl", gold, ["fear"] * 5 + ["joy"] * 15,    # ids r19 .. r0:
                          ids=[f"r{i}" for i in range(20)][::-1])                  # right on r0 .. r14
    c = compare(a, b)
    assert c["n"] == 20 and c["accuracy_a"] == 0.5 and c["accuracy_b"] == 0.75
    assert c["diff"] == pytest.approx(0.25)
    assert (c["only_a_correct"], c["only_b_correct"]) == (0, 5)
    assert c["mcnemar_p"] == pytest.approx(0.0625)
    lo, hi = c["ci95"]
    assert lo <= 0.25 <= hi


def test_compare_refuses_mismatches(tmp_path):
    a = write_predictions(tmp_path / "a.jsonl", ["joy", "fear", "love"], ["joy"] * 3)
    other_ids = write_predictions(tmp_path / "ids.jsonl", ["joy", "fear", "love"], ["joy"] * 3, ids=["r0", "r1", "x9"])
    with pytest.raises(ValueError, match="id 'r2'"):
        compare(a, other_ids)
    with pytest.raises(ValueError, match="id 'x9'"):
        compare(write_predictions(tmp_path / "a2.jsonl", ["joy", "fear"], ["joy"] * 2), other_ids)
    other_gold = write_predictions(tmp_path / "gold.jsonl", ["joy", "anger", "love"], ["joy"] * 3)
    with pytest.raises(ValueError, match="id 'r1': gold label 'fear'"):
        compare(a, other_gold)
    dup = write_predictions(tmp_path / "dup.jsonl", ["joy", "joy"], ["joy"] * 2, ids=["r0", "r0"])
    with pytest.raises(ValueError, match="appears twice"):
        compare(dup, a)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "gold": "joy", "predicted": "joy"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        compare(bad, a)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        compare(tmp_path / "nope.jsonl", a)


def run_cli(*args):
    return run_script("eval.py", *args, check=False)


def test_cli_compare(tmp_path):
    gold = ["joy", "fear", "love", "anger"]
    a = write_predictions(tmp_path / "a.jsonl", gold, ["joy", "joy", "joy", "joy"])
    b = write_predictions(tmp_path / "b.jsonl", gold, ["joy", "fear", "love", "joy"])
    out = tmp_path / "sub" / "cmp.json"
    r = run_cli("--compare", a, b, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "accuracy 0.2500" in r.stdout and "accuracy 0.7500" in r.stdout and "+0.5000" in r.stdout
    assert "McNemar exact p = 0.5" in r.stdout      # only B right on 2: 2 * C(2,0) / 4
    assert json.loads(out.read_text())["mcnemar_p"] == 0.5

    c = write_predictions(tmp_path / "c.jsonl", gold[:3], ["joy"] * 3)
    r = run_cli("--compare", a, c)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "id 'r3'" in r.stderr


def test_cli_help():
    r = run_cli("--help")
    assert r.returncode == 0
    for flag in ["--model", "--task", "--data", "--split", "--out", "--limit", "--batch-size",
                 "--max-new-tokens", "--scoring", "--device", "--dtype", "--compare"]:
        assert flag in r.stdout, flag


def test_cli_evaluate_needs_flags():
    r = run_cli("--task", "q2a")
    assert r.returncode != 0 and "--model is required" in r.stderr


# ----------------------------------------------------------------------------- logprob scoring

def tiny_model(vocab_size=64, eos=(2,), bos=1):
    return tiny_llama(vocab_size, hidden_size=32, intermediate_size=64, head_dim=8, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=bos, eos_token_id=list(eos)).eval()


class CharTokenizer:
    """Stand-in for Tokenizer.render: BOS, one id per character of each turn, end-of-turn (2)
    after each turn; the mask marks the assistant's characters and its end-of-turn."""
    pad_id = 0

    def render(self, messages):
        ids, mask = [1], [False]
        for m in messages:
            turn = [3 + ord(ch) % 60 for ch in m["content"]] + [2]
            ids += turn
            mask += [m["role"] == "assistant"] * len(turn)
        return ids, mask


def test_reply_logprobs_match_one_sequence_at_a_time():
    model, tok = tiny_model(), CharTokenizer()
    encoded = [tok.render([{"role": "user", "content": text}, {"role": "assistant", "content": label}])
               for text in ["short", "a much longer prompt here"] for label in LABELS]
    batched = reply_logprobs(model, encoded, tok.pad_id)
    for i, (ids, mask) in enumerate(encoded):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0, :-1], -1)   # (T-1, V)
        expected = sum(logp[t - 1, ids[t]] for t in range(1, len(ids)) if mask[t])
        torch.testing.assert_close(batched[i], expected, atol=1e-5, rtol=1e-5)


def test_score_labels_picks_the_most_likely_reply():
    model, tok = tiny_model(), CharTokenizer()
    conversations = [[{"role": "user", "content": t}] for t in ["i am glad", "so afraid", "x", "long " * 10]]
    predicted = score_labels(model, tok, conversations, batch_size=3)   # batches of 3 and 1 prompts
    for conv, label in zip(conversations, predicted):
        scores = reply_logprobs(model, [tok.render(conv + [{"role": "assistant", "content": lab}])
                                        for lab in LABELS], tok.pad_id)
        assert label == LABELS[int(scores.argmax())]


def test_evaluate_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="q2a only"):
        evaluate(tmp_path, "q2ra", tmp_path, scoring="logprob")
    with pytest.raises(ValueError, match="task 'rgen'"):
        evaluate(tmp_path, "rgen", tmp_path)
    with pytest.raises(ValueError, match="scoring 'beam'"):
        evaluate(tmp_path, "q2a", tmp_path, scoring="beam")


# ----------------------------------------------------------------------------- end to end

EMOTION_ROWS = [
    ("i feel so alone since she left", "sadness"), ("what a wonderful day at the beach", "joy"),
    ("i adore my little brother", "love"), ("they lied to me again and i am furious", "anger"),
    ("i am scared of the dark hallway", "fear"), ("i did not expect that at all", "surprise"),
    ("my exam went great and i am thrilled", "joy"), ("i miss my old friends", "sadness"),
]


def test_evaluate_end_to_end(tmp_path):
    import tokenizers

    source = tmp_path / "test.jsonl"
    source.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in EMOTION_ROWS))
    corpus = [t for t, _ in EMOTION_ROWS] + list(LABELS) + ["Emotion: joy", "The writer is afraid."]
    build_tokenizer(corpus, tmp_path / "tok", chat_format="llama3", vocab_size=400)
    tok = Tokenizer(tmp_path / "tok")
    vocab = tokenizers.Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json")).get_vocab_size()
    model = tiny_model(vocab_size=vocab, eos=sorted(tok.stop_ids), bos=tok.bos_id)
    checkpoint.save_model(model, tmp_path / "model", tok.serving_files())
    n = len(EMOTION_ROWS)

    for task, scoring, budget, limit in [("q2a", "generate", None, None), ("q2a", "logprob", None, None),
                                         ("q2ra", "generate", 12, None), ("q2a", "generate", None, 5)]:
        out = tmp_path / f"{task}-{scoring}-{limit}"
        report = evaluate(tmp_path / "model", task, source, "test", out, limit=limit, batch_size=3,
                          max_new_tokens=budget, scoring=scoring, device="cpu")
        expected_n = limit or n
        for name in ["predictions.jsonl", "report.json", "report.md"]:
            assert (out / name).is_file(), (task, scoring, name)
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == report["n"] == expected_n
        assert [r["gold"] for r in rows] == [lab for _, lab in EMOTION_ROWS][:expected_n]
        assert all(set(r) == {"id", "text", "gold", "predicted", "raw", "n_tokens", "hit_limit"} for r in rows)
        assert report["unparsed_cut_off"] == sum(r["predicted"] == UNPARSED and r["hit_limit"] for r in rows)
        assert report["unparsed_no_answer"] == sum(r["predicted"] == UNPARSED and not r["hit_limit"] for r in rows)
        counts = report["confusion_matrix"]["counts"]
        assert sum(map(sum, counts)) == expected_n
        assert sum(c["support"] for c in report["per_class"].values()) == expected_n
        assert report["accuracy"] == sum(r["predicted"] == r["gold"] for r in rows) / expected_n
        assert report["unparsed_share"] == sum(r["predicted"] == UNPARSED for r in rows) / expected_n
        assert report["scoring"] == scoring and scoring in (out / "report.md").read_text()
        if scoring == "logprob":
            assert report["unparsed_share"] == 0 and all(r["predicted"] in LABELS for r in rows)
        else:
            max_new = budget or 8
            assert report["max_new_tokens"] == max_new and report["hit_limit"] == sum(r["hit_limit"] for r in rows)
            assert report["max_new_tokens_from"] == ("--max-new-tokens" if budget else "the q2a default (data.reply_budget)")
            assert all(0 <= r["n_tokens"] <= max_new for r in rows)
            assert report["mean_new_tokens"] == pytest.approx(np.mean([r["n_tokens"] for r in rows]))
            assert all(r["predicted"] == parse_label(task, r["raw"]) for r in rows)

    # --compile: the compiled decode step gives the same replies
    import torch
    try:
        evaluate(tmp_path / "model", "q2ra", source, "test", tmp_path / "compiled", batch_size=3,
                 max_new_tokens=12, device="cpu", compile=True)
    finally:
        torch.compiler.reset()
    eager, compiled = ((tmp_path / name / "predictions.jsonl").read_text() for name in ("q2ra-generate-None", "compiled"))
    assert compiled == eager


def test_wilson_interval_matches_the_formula_and_stays_in_bounds():
    from metrics import wilson_interval
    lo, hi = wilson_interval(8, 10)  # the textbook example: 8 of 10, z = 1.96
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(10, 10)[0] == pytest.approx(0.7225, abs=1e-4)
    with pytest.raises(ValueError, match="n=0"):
        wilson_interval(0, 0)
