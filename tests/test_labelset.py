"""Label sets from flags and data (labelset.resolve) and the readers of any labelled text set:
names from --labels, a hub README's ClassLabel metadata, a parquet file's huggingface metadata
or the sorted string labels; other columns, tsv, and the one-line errors of bad input."""
import json

import pytest

import labelset
import readers
from labelset import EMOTION, LabelSet, readme_label_names, resolve
from tiny import BINARY, HUB_README, NEWS, write_binary_hub, write_news_csv

# A hub README's header as the hub writes it (dair-ai/emotion's layout: configs, features, splits).
def test_binary_names_from_the_readme_metadata(tmp_path):
    source = write_binary_hub(tmp_path / "reviews")
    labels = resolve(source)
    assert labels.names == ("negative", "positive")
    assert (labels.instruction, labels.answer_prefix) == (labelset.GENERIC_INSTRUCTION, "Label:")
    rows = readers.read_labelled(source, "test", labels.names)
    assert [r["label"] for r in rows] == ["negative", "positive"] * 3 and rows[0]["text"] == BINARY[0][0]
    assert labels.prompt("hi") == "Classify the text as one of: negative, positive.\n\nText: hi"


def test_names_from_parquet_metadata_and_from_labels(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    features = {"text": {"dtype": "string", "_type": "Value"}, "label": {"names": ["ham", "not spam"], "_type": "ClassLabel"}}
    table = pa.table({"text": ["a", "b"], "label": [0, 1]}).replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": features}})})
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "train-00000-of-00001.parquet")
    assert resolve(tmp_path).names == ("ham", "not spam")
    assert resolve(tmp_path, labels="x, y").names == ("x", "y")  # --labels first


def test_string_labels_sorted_from_a_csv_with_other_columns(tmp_path):
    source = write_news_csv(tmp_path / "news")
    labels = resolve(source, text_column="body", label_column="category")
    assert labels.names == ("Business", "Sci/Tech", "Sports", "World news")
    rows = readers.read_labelled(source, "test", labels.names, "body", "category")
    assert [r["label"] for r in rows] == [y for _, y in NEWS[:4]] and set(rows[0]) == {"id", "text", "label"}
    with pytest.raises(ValueError, match="expected columns text and label, found: category, body, source "
                                         r"\(name them with --text-column and --label-column\)"):
        resolve(source)


def test_tsv_files_and_validation_aliases(tmp_path):
    for split in ("train", "dev"):
        (tmp_path / f"{split}.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in NEWS))
    labels = resolve(tmp_path)
    assert len(readers.read_labelled(tmp_path, "validation", labels.names)) == len(NEWS)  # dev.tsv
    assert readers.read_labelled(tmp_path / "train.tsv", "train", labels.names)[2]["label"] == "Sci/Tech"


def test_emotion_keeps_its_order_and_wording(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": "t", "label": name}) + "\n"
                                                  for name in sorted(EMOTION.names)))
    assert resolve(tmp_path) == EMOTION
    assert EMOTION.prompt("x") == "Classify the emotion expressed in the text as one of: sadness, joy, love, " \
                                  "anger, fear, surprise.\n\nText: x"
    assert EMOTION.stage2_question("x") == "What emotion does this text express? Choose one of: sadness, joy, " \
                                           "love, anger, fear, surprise.\n\nText: x"
    assert EMOTION.answer_line("joy") == "Emotion: joy"
    assert LabelSet.from_settings(json.loads(json.dumps(EMOTION.settings()))) == EMOTION
    custom = resolve(tmp_path, instruction="Which feeling? {labels}", answer_prefix="Feeling:")
    assert custom.prompt("x") == "Which feeling? sadness, joy, love, anger, fear, surprise\n\nText: x"
    assert custom.stage2_question("x") == custom.prompt("x") and custom.answer_line("joy") == "Feeling: joy"


def test_readme_parser_reads_mappings_lists_and_quotes():
    assert readme_label_names(HUB_README.format("'not spam'", '"Sci/Tech"'), "label") == ["not spam", "Sci/Tech"]
    listed = "---\ndataset_info:\n  features:\n  - name: topic\n    dtype:\n      class_label:\n        names:\n" \
             "        - World\n        - Sports\n  - name: text\n    dtype: string\n---\n"
    assert readme_label_names(listed, "topic") == ["World", "Sports"]
    assert readme_label_names(listed, "label") is None and readme_label_names("# no header", "label") is None


def test_label_matcher_names_before_ids_and_prefixes():
    match = readers.label_matcher(("neg", "negative", "1"))
    assert [match(v) for v in ("neg", "NEGATIVE", " negative ", 0, "1", 2, "0", 3, "negat", True)] == \
        ["neg", "negative", "negative", "neg", "1", "1", "neg", None, None, None]


# ----------------------------------------------------------------------------- bad input: one line each

def test_integer_ids_without_names_name_the_labels_flag(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,0\nb,1\n")
    with pytest.raises(ValueError, match=r"integer ids and the data names none of them: name them with --labels"):
        resolve(tmp_path)
    assert resolve(tmp_path, labels="bad,good").names == ("bad", "good")


def test_one_label_only_and_duplicates(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,spam\nb,spam\n")
    with pytest.raises(ValueError, match=r"the labels from the sorted set .* are 1 \(spam\): a classifier needs 2 to 50"):
        resolve(tmp_path)
    with pytest.raises(ValueError, match="'Spam' and 'spam' are the same label up to case"):
        resolve(tmp_path, labels="Spam,spam")
    with pytest.raises(ValueError, match="are 51"):
        resolve(tmp_path, labels=",".join(f"l{i}" for i in range(51)))


def test_unknown_label_in_the_test_split_names_file_and_row(tmp_path):
    source = write_news_csv(tmp_path, test_rows=NEWS[:2] + [("a storm hit", "Weather")])
    labels = resolve(source, text_column="body", label_column="category")
    with pytest.raises(ValueError, match=r"test.csv: row 3: unknown label 'Weather' \(expected 0-3 or one of "
                                         r"Business, Sci/Tech, Sports, World news\)"):
        readers.read_labelled(source, "test", labels.names, "body", "category")
    rows = readers.read_labelled(source, "test", labels.names, "body", "category", skip_bad=True)
    assert len(rows) == 2 and rows.skipped == 1


def test_empty_text_column(tmp_path):
    (tmp_path / "train.csv").write_text("body,label\n,a\n ,b\n")
    with pytest.raises(ValueError, match=r"train.csv: row 1: empty text \(column 'body'\)"):
        resolve(tmp_path, text_column="body")


# ----------------------------------------------------------------------------- prompts, parsing, scores, report

SENTIMENT = LabelSet(("neg", "negative", "not spam", "Sci/Tech"))


def test_prompts_and_targets_follow_the_label_set():
    import data
    row = {"id": 3, "text": " the chip is fast ", "label": "Sci/Tech", "reasoning": "It is about a chip."}
    assert data.prompt_messages("q2a", row, SENTIMENT)[0]["content"] == \
        "Classify the text as one of: neg, negative, not spam, Sci/Tech.\n\nText: the chip is fast"
    assert data.target_text("q2ra", row, SENTIMENT) == "It is about a chip.\nLabel: Sci/Tech"
    assert data.target_text("q2a", row, SENTIMENT) == "Sci/Tech"
    assert data.emotion_as_rgen(row, SENTIMENT)["question"].startswith("Classify the text as one of: neg,")
    with pytest.raises(ValueError, match="label 'joy' is not one of neg, negative, not spam, Sci/Tech"):
        data.target_text("q2a", {**row, "label": "joy"}, SENTIMENT)
    # emotion: today's strings, byte for byte
    emotion_row = {"id": 0, "text": "i feel fine", "label": "joy", "reasoning": "Fine is good."}
    assert data.prompt_messages("q2ra", emotion_row)[0]["content"] == \
        data.CLASSIFY_PROMPT.format(labels="sadness, joy, love, anger, fear, surprise", text="i feel fine")
    assert data.target_text("q2ra", emotion_row) == "Fine is good.\nEmotion: joy"


@pytest.mark.parametrize("reply, expected", [
    ("Label: negative", "negative"), ("Label: neg", "neg"), ("**Label:** NOT SPAM.", "not spam"),
    ("It is about chips.\nLabel: sci/tech", "Sci/Tech"), ("Label: negat", "unparsed"),
    ("Label: negative stuff", "unparsed"), ("Label: neg\nmore words", "unparsed"), ("negative", "unparsed"),
    ("Reasoning says neg.\n\nLabel: spam", "unparsed"), ("Label: not spam<|eot_id|>", "not spam"),
])
def test_q2ra_parser_reads_the_last_line_and_whole_names(reply, expected):
    from metrics import parse_label
    assert parse_label("q2ra", reply, SENTIMENT) == expected


@pytest.mark.parametrize("reply, expected", [
    ("negative", "negative"), ("neg.", "neg"), ("**Not spam**", "not spam"), ("Sci/Tech", "Sci/Tech"),
    ("neg or negative", "unparsed"), ("negatively", "unparsed"), ("spam", "unparsed"),
])
def test_q2a_parser_finds_exactly_one_whole_name(reply, expected):
    from metrics import parse_label
    assert parse_label("q2a", reply, SENTIMENT) == expected


def test_metrics_and_report_for_twenty_labels(tmp_path):
    import struct
    from metrics import classification_metrics
    from report import write_report
    names = [f"class {i}" for i in range(19)] + ["a rather long label | with a pipe"]
    gold = [names[i % 20] for i in range(60)]
    predicted = [g if i % 3 else "unparsed" if i % 2 else names[0] for i, g in enumerate(gold)]
    m = classification_metrics(gold, predicted, names)
    assert m["confusion_matrix"]["columns"] == names + ["unparsed"] and len(m["per_class"]) == 20
    assert m["accuracy"] == pytest.approx(41 / 60)  # row 0 is names[0], predicted right and m["unparsed_share"] == pytest.approx(10 / 60)
    predictions = [{"id": i, "text": "t", "gold": g, "predicted": p, "raw": p, "n_tokens": 1, "hit_limit": False}
                   for i, (g, p) in enumerate(zip(gold, predicted))]
    report = write_report(tmp_path, predictions, {"task": "q2a"}, names)
    assert report["macro_f1"] == m["macro_f1"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| a rather long label \\| with a pipe |" in markdown
    png = tmp_path / "confusion_matrix.png"
    if png.is_file():  # matplotlib installed: a figure that grew with the labels
        width, height = struct.unpack(">II", png.read_bytes()[16:24])
        assert width > 7 * 120 and height > 5.5 * 120
