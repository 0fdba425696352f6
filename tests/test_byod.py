"""Your own data, end to end: the whole pipeline (stage 1, stage 2, q2a and q2ra training, both
evaluations and the comparison) on small labelled sets in the layouts a user brings, with tiny
models and a few steps; the label flags through every stage, the settings they record, the
refused resumes, and bad input stopping with one line before anything is written."""
import json
from pathlib import Path

import pytest

import checkpoint
import labelset
import pipeline
from helpers import run_script
from tiny import BINARY, NEWS, tiny_llama, write_binary_hub, write_news_csv
from tokenizer import Tokenizer, build_tokenizer

TOPICS = [("rain all week in the north", "weather"), ("the striker scored twice", "sport"),
          ("snow closed the roads", "weather"), ("a late goal won it", "sport"), ("sunny and warm", "weather"),
          ("the coach was sacked", "sport")]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama with a tokenizer learnt on every set below, and a small stage-1 corpus."""
    root = tmp_path_factory.mktemp("byod")
    rgen = root / "rgen"
    rgen.mkdir()
    rows = [{"question": f"Is '{t}' good news?", "answer": "yes" if i % 2 else "no", "reasoning": f"It says {t}."}
            for i, (t, _) in enumerate(BINARY + NEWS + TOPICS)]
    (rgen / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [r["question"] + " " + r["reasoning"] for r in rows] + [
        labelset.GENERIC_INSTRUCTION, "Label: negative positive Business Sci/Tech Sports World news weather sport",
        "Classify the text as one of Text: Question Answer Write the reasoning that leads from the question to"]
    tok_dir = build_tokenizer(texts, root / "tok", chat_format="llama3", vocab_size=600)
    tokenizer = Tokenizer(tok_dir)
    model = tiny_llama(tokenizer.vocab_size, tokenizer=tokenizer)
    return root, checkpoint.save_model(model, root / "model", tokenizer.serving_files()), rgen


def config(base, out, data, **flags) -> pipeline.PipelineConfig:
    root, model, rgen = base
    return pipeline.PipelineConfig(
        out=str(out), base_model=str(model), rgen_data=str(rgen), data=str(data), rgen_examples=8, rgen_epochs=1.0,
        rgen_max_seq_len=320, cls_epochs=1.0, cls_max_seq_len=320, val_examples=2, lr=1e-3, batch_size=4, grad_accum=1,
        augment_max_new_tokens=6, gen_batch_size=8, device="cpu", dtype="fp32", **flags)


def check_run(out: Path, names: list[str], prefix: str = "Label:"):
    """Both classifiers, both reports, the comparison and the summary, all with this label set."""
    for task in ("q2a", "q2ra"):
        recorded = json.loads((out / task / "best" / "label_set.json").read_text())
        assert recorded["names"] == names and recorded["answer_prefix"] == prefix
        assert json.loads((out / task / "train_config.json").read_text())["label_set"] == recorded
        report = json.loads((out / f"eval_{task}" / "report.json").read_text())
        assert report["label_set"]["names"] == names and report["confusion_matrix"]["rows"] == names
        rows = [json.loads(line) for line in (out / f"eval_{task}" / "predictions.jsonl").read_text().splitlines()]
        assert rows and all(r["gold"] in names and r["predicted"] in names + ["unparsed"] for r in rows)
    sidecar = json.loads((out / "augment" / "train.jsonl.meta.json").read_text())
    assert sidecar["label_set"]["names"] == names
    augmented = [json.loads(line) for line in (out / "augment" / "train.jsonl").read_text().splitlines()]
    assert {r["label"] for r in augmented} <= set(names)
    summary = (out / "summary.md").read_text()
    assert "q2ra - q2a" in summary and "paper" not in summary  # the paper's figures are emotion's
    assert set(json.loads((out / "compare" / "compare.json").read_text())) >= {"diff", "mcnemar_p"}


def test_binary_ids_named_by_the_hub_readme(base, tmp_path):
    data = write_binary_hub(tmp_path / "reviews")
    pipeline.run_pipeline(config(base, tmp_path / "run", data))
    check_run(tmp_path / "run", ["negative", "positive"])
    marker = json.loads((tmp_path / "run" / "q2a" / "stage.json").read_text())
    assert {k: marker["settings"][k] for k in labelset.FLAGS} == {name: d for name, (d, _) in labelset.FLAGS.items()}
    # another label set for the same run folder is refused, by the pipeline and by train.py --resume
    with pytest.raises(SystemExit, match=r"augment was made with other settings \(labels\)"):
        pipeline.run_pipeline(config(base, tmp_path / "run", data, labels="bad,good"))
    import train
    saved = json.loads((tmp_path / "run" / "q2a" / "train_config.json").read_text())["config"]
    with pytest.raises(ValueError, match="cannot --resume it with labels='bad,good'"):
        train.train(train.TrainConfig(**{**saved, "labels": "bad,good", "resume": True}))
    (data / "README.md").write_text((data / "README.md").read_text().replace("negative", "unhappy"))
    with pytest.raises(ValueError, match=r"started with label_set=.*'negative'.*, cannot --resume it with label_set=.*'unhappy'"):
        train.train(train.TrainConfig(**{**saved, "resume": True}))  # the same flags, but the data names others


def test_multi_word_string_labels_in_other_columns(base, tmp_path):
    data = write_news_csv(tmp_path / "news")
    cfg = config(base, tmp_path / "run", data, text_column="body", label_column="category", answer_prefix="Topic:",
                 instruction="Which section is this news for? {labels}")
    pipeline.run_pipeline(cfg)
    names = ["Business", "Sci/Tech", "Sports", "World news"]
    check_run(tmp_path / "run", names, prefix="Topic:")
    recorded = json.loads((tmp_path / "run" / "q2ra" / "best" / "label_set.json").read_text())
    assert recorded["instruction"] == "Which section is this news for? {labels}"
    assert (recorded["text_column"], recorded["label_column"]) == ("body", "category")
    # logprob scoring scores every label; a checkpoint is refused with another wording
    import eval as evaluation
    report = evaluation.evaluate(tmp_path / "run" / "q2a" / "best", "q2a", data, "test", tmp_path / "logprob",
                                 scoring="logprob", device="cpu")
    assert report["unparsed_share"] == 0 and report["label_set"]["names"] == names
    with pytest.raises(ValueError, match="was trained with another label set: answer_prefix='Label:'"):
        evaluation.evaluate(tmp_path / "run" / "q2a" / "best", "q2a", data, "test", tmp_path / "refused",
                            labels=labelset.resolve(data, text_column="body", label_column="category",
                                                    instruction="Which section is this news for? {labels}"))
    assert not (tmp_path / "refused").exists()
    # eval.py without label flags: the checkpoint's own label set, its columns included
    run_script("eval.py", "--model", tmp_path / "run" / "q2ra" / "best", "--task", "q2ra", "--data", data,
               "--out", tmp_path / "cli", "--device", "cpu")
    assert json.loads((tmp_path / "cli" / "report.json").read_text())["label_set"] == recorded


def test_tsv_set(base, tmp_path):
    data = tmp_path / "topics"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in TOPICS))
    pipeline.run_pipeline(config(base, tmp_path / "run", data))
    check_run(tmp_path / "run", ["sport", "weather"])


def test_emotion_wording_unchanged(base, tmp_path):
    """Six emotion names as strings: dair-ai/emotion's order, prompt and answer line, not the generic ones."""
    data = tmp_path / "emotion"
    data.mkdir()
    rows = [(t, name) for (t, _), name in zip(BINARY, labelset.EMOTION.names)]
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    import train
    out = tmp_path / "q2a"
    train.train(train.TrainConfig(task="q2a", data=str(data), out=str(out), model=str(base[1]), val_examples=0,
                                  max_steps=1, device="cpu", dtype="fp32"))
    assert labelset.LabelSet.from_settings(json.loads((out / "best" / "label_set.json").read_text())) == labelset.EMOTION


# ----------------------------------------------------------------------------- bad input: one line, nothing written

@pytest.mark.parametrize("case, match", [
    ("ids without names", r"integer ids and the data names none of them: name them with --labels"),
    ("unknown test label", r"test.csv: row 2: unknown label 'maybe' \(expected 0-1 or one of negative, positive\)"),
    ("one label", r"are 1 \(spam\): a classifier needs 2 to 50 labels"),
    ("empty text", r"train.csv: row 1: empty text"),
])
def test_bad_data_stops_the_pipeline_before_it_writes(base, tmp_path, case, match):
    data = tmp_path / "data"
    data.mkdir()
    train_csv, test_csv = {
        "ids without names": ("text,label\na,0\nb,1\n", "text,label\na,0\n"),
        "unknown test label": ("text,label\na,negative\nb,positive\n", "text,label\na,negative\nb,maybe\n"),
        "one label": ("text,label\na,spam\nb,spam\n", "text,label\na,spam\n"),
        "empty text": ("text,label\n,a\n,b\n", "text,label\nx,a\n"),
    }[case]
    (data / "train.csv").write_text(train_csv)
    (data / "test.csv").write_text(test_csv)
    with pytest.raises(ValueError, match=match):
        pipeline.run_pipeline(config(base, tmp_path / "run", data))
    assert not (tmp_path / "run").exists()
    if case == "unknown test label":  # the command line: one line on stderr, no traceback
        result = run_script("pipeline.py", "--data", data, "--out", tmp_path / "cli", check=False)
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
        assert "unknown label 'maybe'" in result.stderr and not (tmp_path / "cli").exists()
