"""data.py: chat rendering against transformers' apply_chat_template, the assistant mask, special
and stop ids (also in Llama 3.2's id layout), the tasks' prompts, and every reader layout with
its bad-data errors. Tokenizers and data files are built in tmp dirs; nothing is downloaded."""
import gzip
import json
import sys

import pytest

import data
import readers
from data import LABELS
from demo import write_reasoning_gen_demo
from files import write_json
from tokenizer import CHAT_TEMPLATES, CHAT_TOKENS, TOKENIZER_FILES, Tokenizer, build_tokenizer

CORPUS = [
    "i feel so alone since she left", "what a wonderful day at the beach", "i adore my little brother",
    "they lied to me again and i am furious", "i am scared of the dark hallway", "i did not expect that",
    "The writer lost a friend and misses them.\nEmotion: sadness", "Question: what is 2 + 2?\n\nAnswer: 4",
    "Classify the emotion expressed in the text.", "user assistant system", *LABELS,
]
END_OF_TURN = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}

ROW = {"id": 7, "text": "i feel so alone since she left", "label": "sadness",
       "reasoning": "  The writer is alone and misses someone.\n"}
RGEN_ROW = {"id": "r1", "question": "What is 2 + 2?", "answer": "4", "reasoning": "Two plus two makes four."}

CONVERSATIONS = {
    "user": [{"role": "user", "content": "hello there"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}],
    "reply": [{"role": "user", "content": "how do you feel?"}, {"role": "assistant", "content": "  joy \n"}],
    "multi": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "one"},
              {"role": "assistant", "content": "first answer"}, {"role": "user", "content": " two\n"},
              {"role": "assistant", "content": "\nsecond answer with  spaces "}],
    "unicode": [{"role": "user", "content": "Ça va? 😊"}, {"role": "assistant", "content": "très bien 😊 – merci"}],
}


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {fmt: build_tokenizer(CORPUS, root / fmt, chat_format=fmt, vocab_size=400) for fmt in ("llama3", "chatml")}


@pytest.fixture(scope="module")
def toks(tok_dirs):
    return {fmt: Tokenizer(d) for fmt, d in tok_dirs.items()}


def hf_ids(folder, messages, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # v5: a BatchEncoding; v4: a list


def raw_decode(tok, ids):
    return tok.tk.decode(ids, skip_special_tokens=False)


# ----------------------------------------------------------------------------- rendering

@pytest.mark.parametrize("fmt", ["llama3", "chatml"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("gen", [False, True])
def test_render_matches_apply_chat_template(tok_dirs, toks, fmt, name, gen):
    ids, mask = toks[fmt].render(CONVERSATIONS[name], add_generation_prompt=gen)
    assert ids == hf_ids(tok_dirs[fmt], CONVERSATIONS[name], gen)
    assert len(mask) == len(ids)


@pytest.mark.parametrize("fmt", ["llama3", "chatml"])
@pytest.mark.parametrize("task", data.TASKS)
def test_render_task_examples_match_apply_chat_template(tok_dirs, toks, fmt, task):
    row = RGEN_ROW if task == "rgen" else ROW
    assert toks[fmt].render(data.example_messages(task, row))[0] == \
        hf_ids(tok_dirs[fmt], data.example_messages(task, row), False)
    assert toks[fmt].render(data.prompt_messages(task, row), add_generation_prompt=True)[0] == \
        hf_ids(tok_dirs[fmt], data.prompt_messages(task, row), True)


def test_exactly_one_bos(toks):
    tok = toks["llama3"]
    bos = tok.special["<|begin_of_text|>"]
    assert tok.bos_id == bos
    # the tokenizer's own post-processor adds BOS, as Llama 3's does; encode() and render() must not
    assert tok.tk.encode("hello").ids[0] == bos
    assert bos not in tok.encode("hello")
    for messages in CONVERSATIONS.values():
        ids, _ = tok.render(messages, add_generation_prompt=True)
        assert ids[0] == bos and ids.count(bos) == 1
    chatml = toks["chatml"]
    assert chatml.bos_id is None
    assert chatml.render(CONVERSATIONS["multi"])[0][0] == chatml.special["<|im_start|>"]


@pytest.mark.parametrize("fmt", ["llama3", "chatml"])
@pytest.mark.parametrize("task", data.TASKS)
def test_assistant_mask_is_reply_plus_end_of_turn(toks, fmt, task):
    tok = toks[fmt]
    row = RGEN_ROW if task == "rgen" else ROW
    ids, mask = tok.render(data.example_messages(task, row))
    reply = data.target_text(task, row)
    assert raw_decode(tok, [i for i, m in zip(ids, mask) if m]) == reply + END_OF_TURN[fmt]
    first = mask.index(True)  # one contiguous stretch at the end (chatml: then the turn's "\n")
    last = len(mask) - 1 - mask[::-1].index(True)
    assert all(mask[first:last + 1]) and ids[last] == tok.special[END_OF_TURN[fmt]]
    prompt, prompt_mask = tok.render(data.prompt_messages(task, row), add_generation_prompt=True)
    assert ids[:first] == prompt and not any(prompt_mask)  # the prompt and headers are never targets


@pytest.mark.parametrize("fmt", ["llama3", "chatml"])
def test_mask_covers_every_assistant_turn(toks, fmt):
    tok = toks[fmt]
    ids, mask = tok.render(CONVERSATIONS["multi"])
    eot = tok.special[END_OF_TURN[fmt]]
    strip = str.strip if fmt == "llama3" else (lambda s: s)  # llama3 strips contents, chatml keeps them
    targets = "".join(strip(m["content"]) + END_OF_TURN[fmt] for m in CONVERSATIONS["multi"] if m["role"] == "assistant")
    assert raw_decode(tok, [i for i, m in zip(ids, mask) if m]) == targets
    assert sum(m for i, m in zip(ids, mask) if i == eot) == 2 and ids.count(eot) == 5


@pytest.mark.parametrize("fmt", ["llama3", "chatml"])
def test_mask_with_multibyte_characters(toks, fmt):
    tok = toks[fmt]
    ids, mask = tok.render(CONVERSATIONS["unicode"])
    assert raw_decode(tok, [i for i, m in zip(ids, mask) if m]) == "très bien 😊 – merci" + END_OF_TURN[fmt]


@pytest.mark.parametrize("fmt", ["llama3", "chatml"])
def test_segments_encode_like_the_whole_string(toks, fmt):
    """render encodes each stretch between special tokens whole and splits header from reply by
    offsets; for these tokenizers that equals encoding the two parts separately."""
    tok = toks[fmt]
    for task in data.TASKS:
        row = RGEN_ROW if task == "rgen" else ROW
        for m in data.example_messages(task, row):
            prefix, content = ("\n\n", m["content"].strip()) if fmt == "llama3" else (m["role"] + "\n", m["content"])
            assert tok.encode(prefix) + tok.encode(content) == tok.encode(prefix + content)


# ----------------------------------------------------------------------------- special ids

def test_stop_and_pad_ids(toks):
    llama, chatml = toks["llama3"], toks["chatml"]
    assert llama.chat_format == "llama3" and chatml.chat_format == "chatml"
    assert llama.stop_ids == {llama.special[t] for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")}
    assert llama.pad_id == llama.special["<|end_of_text|>"]     # Llama 3.2 names no pad token
    assert chatml.stop_ids == {chatml.special[t] for t in ("<|im_end|>", "<|endoftext|>")}
    assert chatml.pad_id == chatml.special["<|endoftext|>"]     # named as pad_token
    assert llama.vocab_size == len(llama.tk.get_vocab())


def test_llama32_id_layout(tmp_path):
    """A tokenizer with Llama 3.2's ids (128000 BPE tokens, then its special tokens) and its
    config files: names map to 128000.., and stop ids are 128001, 128008, 128009."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    import tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), 128000)})
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
             "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"]
    tk.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    tk.save(str(tmp_path / "tokenizer.json"))
    config = {"added_tokens_decoder": {str(128000 + i): {"content": n, "special": True} for i, n in enumerate(names)},
              "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
              "chat_template": CHAT_TEMPLATES["llama3"], "tokenizer_class": "PreTrainedTokenizerFast"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))

    tok = Tokenizer(tmp_path)
    assert {n: tok.special[n] for n in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                        "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>")} == {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009}
    assert tok.chat_format == "llama3" and tok.bos_id == 128000 and tok.pad_id == 128001
    assert tok.stop_ids == {128001, 128008, 128009}
    messages = data.example_messages("q2a", ROW)
    ids, mask = tok.render(messages)
    assert ids[:2] == [128000, 128006] and ids[-1] == 128009 and ids.count(128000) == 1
    assert [i for i, m in zip(ids, mask) if m][-1] == 128009
    assert ids == hf_ids(tmp_path, messages, False)


def test_stop_ids_include_config_eos(tmp_path, tok_dirs, toks):
    import shutil
    shutil.copytree(tok_dirs["chatml"], tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert Tokenizer(tmp_path / "model").stop_ids == toks["chatml"].stop_ids | {5}


def test_tokenizer_folder_errors(tmp_path, tok_dirs):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((tok_dirs["llama3"] / "tokenizer.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer(tmp_path)
    # a plain BPE without chat tokens
    build_tokenizer(CORPUS, tmp_path / "plain", vocab_size=300)
    config = json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
    (tmp_path / "plain" / "tokenizer_config.json").write_text(json.dumps({**config, "added_tokens_decoder": {}}))
    plain = json.loads((tmp_path / "plain" / "tokenizer.json").read_text())
    plain["added_tokens"] = []
    plain["post_processor"] = None
    (tmp_path / "plain" / "tokenizer.json").write_text(json.dumps(plain))
    with pytest.raises(ValueError, match=f"{tmp_path / 'plain'}: unknown chat format"):
        Tokenizer(tmp_path / "plain")


@pytest.mark.parametrize("chat_format", ["llama3", "chatml"])
def test_save_writes_our_chat_template_and_stop_ids(tmp_path, tok_dirs, toks, chat_format):
    """A saved folder serves the prompts we train on: tokenizer.json unchanged, our template in
    place of the base model's (which may add lines we never train with), every stop id."""
    original = json.loads((tok_dirs[chat_format] / "tokenizer_config.json").read_text())
    (tok_dirs[chat_format] / "tokenizer_config.json").write_text(json.dumps(
        {**original, "chat_template": "{{ 'Cutting Knowledge Date: December 2023' }}"}))
    try:
        out = Tokenizer(tok_dirs[chat_format]).save(tmp_path / "copy", max_new_tokens=42)
    finally:
        (tok_dirs[chat_format] / "tokenizer_config.json").write_text(json.dumps(original))
    assert (out / "tokenizer.json").read_bytes() == (tok_dirs[chat_format] / "tokenizer.json").read_bytes()
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved == {**original, "chat_template": CHAT_TEMPLATES[chat_format]}
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == sorted(toks[chat_format].stop_ids) and generation["max_new_tokens"] == 42
    for messages in CONVERSATIONS.values():
        assert Tokenizer(out).render(messages) == toks[chat_format].render(messages)
        assert hf_ids(out, messages, True) == toks[chat_format].render(messages, add_generation_prompt=True)[0]
    assert "max_new_tokens" not in json.loads(Tokenizer(out).serving_files()["generation_config.json"])


def test_build_tokenizer_is_deterministic(tmp_path):
    a = build_tokenizer(CORPUS, tmp_path / "a", chat_format="chatml", vocab_size=350)
    b = build_tokenizer(CORPUS, tmp_path / "b", chat_format="chatml", vocab_size=350)
    for name in TOKENIZER_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    config = json.loads((a / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["eos_token"] == "<|im_end|>"
    assert {v["content"] for v in config["added_tokens_decoder"].values()} == set(CHAT_TOKENS["chatml"])
    with pytest.raises(ValueError, match="chat_format 'alpaca'"):
        build_tokenizer(CORPUS, tmp_path / "c", chat_format="alpaca")


def test_encode_decode(toks):
    tok = toks["llama3"]
    text = "i feel so alone, and 42 émotions\n"
    assert tok.decode(tok.encode(text)) == text
    ids, _ = tok.render(data.example_messages("q2a", ROW))
    decoded = tok.decode(ids)
    assert "<|" not in decoded and "sadness" in decoded


# ----------------------------------------------------------------------------- tasks

def test_task_prompts():
    q2a, q2ra = data.prompt_messages("q2a", ROW), data.prompt_messages("q2ra", ROW)
    assert q2a == q2ra and len(q2a) == 1 and q2a[0]["role"] == "user"
    assert ROW["text"] in q2a[0]["content"] and all(label in q2a[0]["content"] for label in LABELS)
    assert data.target_text("q2a", ROW) == "sadness"
    q2ra_target = data.target_text("q2ra", ROW)
    assert q2ra_target.splitlines()[-1] == f"{data.ANSWER_PREFIX} sadness" == "Emotion: sadness"
    assert q2ra_target.startswith("The writer is alone")
    rgen = data.prompt_messages("rgen", RGEN_ROW)[0]["content"]
    assert RGEN_ROW["question"] in rgen and RGEN_ROW["answer"] in rgen
    assert data.target_text("rgen", RGEN_ROW) == RGEN_ROW["reasoning"]
    assert data.example_messages("rgen", RGEN_ROW)[-1] == {"role": "assistant", "content": RGEN_ROW["reasoning"]}
    assert isinstance(data.PROMPT_VERSION, str) and data.PROMPT_VERSION


def test_emotion_as_rgen_uses_the_stage1_prompt():
    as_rgen = data.emotion_as_rgen(ROW)
    assert as_rgen["id"] == ROW["id"] and as_rgen["answer"] == "sadness" and ROW["text"] in as_rgen["question"]
    content = data.prompt_messages("rgen", as_rgen)[0]["content"]
    assert content.startswith(data.RGEN_PROMPT.split("{")[0]) and ROW["text"] in content and "sadness" in content


def test_task_errors():
    with pytest.raises(ValueError, match="unknown task 'q2x'"):
        data.prompt_messages("q2x", ROW)
    with pytest.raises(ValueError, match="unknown task"):
        data.target_text("q2x", ROW)
    with pytest.raises(ValueError, match="row 7: label 'happy'"):
        data.target_text("q2a", {**ROW, "label": "happy"})
    with pytest.raises(ValueError, match="row 7: field 'reasoning'"):
        data.target_text("q2ra", {**ROW, "reasoning": " "})


def test_encode_example_never_cuts_a_label(toks):
    """Too long: q2ra's reasoning is shortened so that its answer line and end-of-turn token stay;
    q2a is dropped; rgen is cut from the right; a q2ra without room for its label is dropped."""
    tok = toks["llama3"]
    ids, mask = tok.render(data.example_messages("q2ra", ROW))
    assert data.encode_example(tok, "q2ra", ROW, len(ids)) == {"input_ids": ids, "target_mask": mask, "fit": "whole"}
    short = data.encode_example(tok, "q2ra", ROW, len(ids) - 3)
    assert short["fit"] == "shortened" and len(ids) - 8 < len(short["input_ids"]) <= len(ids) - 3
    reply = tok.tk.decode([i for i, m in zip(short["input_ids"], short["target_mask"]) if m], skip_special_tokens=False)
    reasoning, answer = reply.removesuffix("<|eot_id|>").rsplit("\n", 1)
    assert answer == "Emotion: sadness" and reply.endswith("<|eot_id|>")
    assert ROW["reasoning"].strip().startswith(reasoning) and len(reasoning) < len(ROW["reasoning"].strip())
    prompt = len(tok.render(data.prompt_messages("q2ra", ROW), add_generation_prompt=True)[0])
    assert data.encode_example(tok, "q2ra", ROW, prompt + 4)["fit"] == "dropped"   # no room for the answer line

    ids, _ = tok.render(data.example_messages("q2a", ROW))
    assert data.encode_example(tok, "q2a", ROW, len(ids) - 1) == {"input_ids": [], "target_mask": [], "fit": "dropped"}
    ids, mask = tok.render(data.example_messages("rgen", RGEN_ROW))
    cut = data.encode_example(tok, "rgen", RGEN_ROW, len(ids) - 3)
    assert cut == {"input_ids": ids[:-3], "target_mask": mask[:-3], "fit": "cut"}


def test_reply_budget_covers_a_capped_reasoning_and_its_answer_line(toks):
    """A q2ra reply whose reasoning is as long as stage 2's cap, then its answer line and its
    end-of-turn token, fits the budget: with every label."""
    for tok in toks.values():
        reasoning = tok.decode(tok.encode(" ".join(["The writer is alone and misses someone."] * 30))[:40])
        assert len(tok.encode(reasoning.strip())) <= 40
        for label in LABELS:
            _, mask = tok.render(data.example_messages("q2ra", {**ROW, "reasoning": reasoning, "label": label}))
            assert sum(mask) <= data.reply_budget(tok, "q2ra", reasoning_tokens=40)
            _, mask = tok.render(data.example_messages("q2a", {**ROW, "label": label}))
            assert sum(mask) <= data.reply_budget(tok, "q2a")
        assert data.reply_budget(tok, "q2a") == 8 and data.reply_budget(tok, "rgen", 99) == 99
    with pytest.raises(ValueError, match="unknown task"):
        data.reply_budget(tok, "q2x")


# ----------------------------------------------------------------------------- emotion readers

EMOTION = [("i feel so alone", 0), ("what a wonderful day", 1), ("i adore you", 2), ("i am furious", 3)]


def write_parquet(path, columns: dict):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")  # optional at run time
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def emotion_columns(rows=EMOTION):
    return {"text": [t for t, _ in rows], "label": [lab for _, lab in rows]}


def expected(rows=EMOTION, ids=None):
    return [{"id": i if ids is None else ids[i], "text": t, "label": LABELS[lab]} for i, (t, lab) in enumerate(rows)]


@pytest.mark.parametrize("layout", ["split", "data", "config_folder"])
def test_read_emotion_parquet_layouts(tmp_path, layout):
    sub = {"split": "split", "data": "data", "config_folder": "unsplit"}[layout]
    for split in readers.EMOTION_SPLITS:
        write_parquet(tmp_path / sub / f"{split}-00000-of-00001.parquet", emotion_columns(EMOTION[:3] if split == "test" else EMOTION))
    source = tmp_path / "unsplit" if layout == "config_folder" else tmp_path
    assert readers.read_emotion(source, "train") == expected()
    assert readers.read_emotion(source, "test") == expected(EMOTION[:3])


def test_read_emotion_prefers_the_split_config(tmp_path):
    write_parquet(tmp_path / "split" / "train-00000-of-00001.parquet", emotion_columns(EMOTION[:2]))
    write_parquet(tmp_path / "unsplit" / "train-00000-of-00001.parquet", emotion_columns())
    assert readers.read_emotion(tmp_path, "train") == expected(EMOTION[:2])


def test_read_emotion_shards_continue_ids(tmp_path):
    write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", emotion_columns(EMOTION[:2]))
    write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", emotion_columns(EMOTION[2:]))
    assert readers.read_emotion(tmp_path, "train") == expected()


def test_read_emotion_jsonl_gz_layout(tmp_path):
    (tmp_path / "data").mkdir()
    with gzip.open(tmp_path / "data" / "validation.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in EMOTION)
    assert readers.read_emotion(tmp_path, "validation") == expected()


def test_read_emotion_plain_files(tmp_path):
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"text": t, "label": LABELS[lab].upper()}) + "\n\n"
                                                 for t, lab in EMOTION))
    assert readers.read_emotion(tmp_path / "test.jsonl", "test") == expected()   # a file is the split
    assert readers.read_emotion(tmp_path, "test") == expected()                  # found as {split}.jsonl
    (tmp_path / "train.csv").write_text("id,text,label\n" + "".join(f"x{i},\"{t}, really\",{lab}\n"
                                                                    for i, (t, lab) in enumerate(EMOTION)))
    rows = readers.read_emotion(tmp_path, "train")
    assert [r["id"] for r in rows] == ["x0", "x1", "x2", "x3"]
    assert rows[0]["text"] == "i feel so alone, really" and [r["label"] for r in rows] == LABELS[:4]
    (tmp_path / "names.csv").write_text("text,label\n" + "".join(f"{t},{LABELS[lab]}\n" for t, lab in EMOTION))
    assert readers.read_emotion(tmp_path / "names.csv", "train") == expected()


def test_read_emotion_id_column_in_parquet(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", {**emotion_columns(), "id": ["a", "b", "c", "d"]})
    assert readers.read_emotion(path, "train") == expected(ids=["a", "b", "c", "d"])


def test_read_emotion_missing_split_and_source(tmp_path):
    write_parquet(tmp_path / "split" / "train-00000-of-00001.parquet", emotion_columns())
    with pytest.raises(FileNotFoundError, match="no 'test' split here"):
        readers.read_emotion(tmp_path, "test")
    with pytest.raises(ValueError, match="split 'dev'"):
        readers.read_emotion(tmp_path, "dev")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        readers.read_emotion(tmp_path / "nope.jsonl", "train")


BAD_JSONL = [
    ({"text": "fine", "label": 0}, None),
    ({"label": 1}, "line 2: missing field 'text'"),
    ({"text": "  ", "label": 1}, "line 3: empty text"),
    ({"text": "ok", "label": "happy"}, "line 4: unknown label 'happy'"),
    ({"text": "ok", "label": 9}, "line 5: unknown label 9"),
    ({"text": "ok"}, "line 6: missing field 'label'"),
    ("not json", "line 7: not a JSON object"),
    ({"text": "fine too", "label": "Joy"}, None),
]


def test_read_emotion_bad_rows(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    lines = [r if isinstance(r, str) else json.dumps(r) for r, _ in BAD_JSONL]
    for n in range(1, len(BAD_JSONL) - 1):  # each bad row alone errors with its file and line
        if BAD_JSONL[n][1] is None:
            continue
        path.write_text("\n".join([lines[0]] + [""] * (n - 1) + [lines[n]]) + "\n")  # blank lines count
        with pytest.raises(ValueError) as err:
            readers.read_emotion(path, "train")
        assert str(err.value).startswith(f"{path}: {BAD_JSONL[n][1]}") and "\n" not in str(err.value)
    path.write_text("\n".join(lines) + "\n")
    rows = readers.read_emotion(path, "train", skip_bad=True)
    assert rows == [{"id": 0, "text": "fine", "label": "sadness"}, {"id": 7, "text": "fine too", "label": "joy"}]
    assert rows.skipped == 6
    assert f"{path}: skipped 6 bad row(s) of 8; the first: line 2: missing field 'text'" in capsys.readouterr().err


def test_read_emotion_bad_rows_csv_and_parquet(tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("text,label\nok,0\n,1\nfine,surprised\n")
    with pytest.raises(ValueError, match=f"{csv_path}: row 2: empty text"):
        readers.read_emotion(csv_path, "train")
    assert readers.read_emotion(csv_path, "train", skip_bad=True).skipped == 2
    pq_path = write_parquet(tmp_path / "test.parquet", {"text": ["a", "b", None], "label": [0, 7, 1]})
    with pytest.raises(ValueError, match=f"{pq_path}: row 2: unknown label 7"):
        readers.read_emotion(pq_path, "test")
    rows = readers.read_emotion(pq_path, "test", skip_bad=True)
    assert list(rows) == [{"id": 0, "text": "a", "label": "sadness"}] and rows.skipped == 2


def test_read_emotion_wrong_columns(tmp_path):
    pq_path = write_parquet(tmp_path / "train.parquet", {"sentence": ["a"], "emotion": [0]})
    with pytest.raises(ValueError, match=f"{pq_path}: expected columns text and label, found: sentence, emotion"):
        readers.read_emotion(pq_path, "train", skip_bad=True)  # a file-level error: never skipped
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("sentence,label\na,0\n")
    with pytest.raises(ValueError, match=f"{csv_path}: expected columns text and label, found: sentence, label"):
        readers.read_emotion(csv_path, "train")


def test_missing_pyarrow_gives_the_install_hint(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "train.parquet", emotion_columns())
    monkeypatch.setitem(sys.modules, "pyarrow", None)   # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ModuleNotFoundError, match="pip install pyarrow") as err:
        readers.read_emotion(path, "train")
    assert str(path) in str(err.value)
    with pytest.raises(ModuleNotFoundError, match="pip install pyarrow"):
        list(readers.iter_reasoning_gen(path))


def test_hub_ids_are_downloaded(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    write_parquet(tmp_path / "split" / "test-00000-of-00001.parquet", emotion_columns())
    calls = []

    def fake_download(repo_id, repo_type=None, **kw):
        calls.append((repo_id, repo_type))
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert readers.read_emotion("dair-ai/emotion", "test") == expected()
    assert calls == [("dair-ai/emotion", "dataset")]

    def offline(*args, **kw):
        raise OSError("We couldn't connect to the hub.\nmore details")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(RuntimeError, match=r"dair-ai/emotion: not a local path.*offline\? OSError: We couldn't connect") as err:
        readers.read_emotion("dair-ai/emotion", "test")
    assert "\n" not in str(err.value)
    with pytest.raises(RuntimeError, match="syvai/reasoning-gen: not a local path"):
        readers.iter_reasoning_gen("syvai/reasoning-gen")


# ----------------------------------------------------------------------------- reasoning-gen

def rgen_columns(start, n, names=("question", "answer", "reasoning")):
    q, a, r = names
    return {q: [f"question {i}" for i in range(start, start + n)], a: [f"answer {i}" for i in range(start, start + n)],
            r: [f"reasoning {i}" for i in range(start, start + n)]}


def test_iter_reasoning_gen_streams_shards(tmp_path):
    write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", rgen_columns(0, 2500))  # 3 batches
    write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", rgen_columns(2500, 10))
    rows = list(readers.iter_reasoning_gen(tmp_path))
    assert len(rows) == 2510 and [r["id"] for r in rows] == list(range(2510))
    assert rows[2505] == {"id": 2505, "question": "question 2505", "answer": "answer 2505", "reasoning": "reasoning 2505"}
    assert [r["id"] for r in readers.iter_reasoning_gen(tmp_path, max_examples=3)] == [0, 836, 1673]


def test_iter_reasoning_gen_subset_spreads_over_every_shard(tmp_path):
    """A set whose shards are grouped by domain: max_examples takes rows from all of them, and a
    bad row that is not taken is no error."""
    math_rows, code_rows = rgen_columns(0, 6), rgen_columns(6, 6)
    code_rows["answer"][1] = None                                  # row 7: bad, but not picked
    write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", math_rows)
    write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", code_rows)
    assert [r["id"] for r in readers.iter_reasoning_gen(tmp_path, max_examples=4)] == [0, 3, 6, 9]
    assert len(list(readers.iter_reasoning_gen(tmp_path, max_examples=20, skip_bad=True))) == 11  # all but row 7
    (tmp_path / "data" / "train-00001-of-00002.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="train-00001-of-00002.parquet: not a readable parquet file"):
        list(readers.iter_reasoning_gen(tmp_path, max_examples=4))


def test_iter_reasoning_gen_column_aliases(tmp_path):
    path = write_parquet(tmp_path / "shard.parquet", {**rgen_columns(0, 2, ("Prompt", "response", "rationale")),
                                                      "id": ["q-a", "q-b"], "source": ["x", "y"]})
    assert list(readers.iter_reasoning_gen(path)) == [
        {"id": "q-a", "question": "question 0", "answer": "answer 0", "reasoning": "reasoning 0"},
        {"id": "q-b", "question": "question 1", "answer": "answer 1", "reasoning": "reasoning 1"}]


def test_iter_reasoning_gen_columns_named_by_the_user(tmp_path):
    """--rgen-columns names the columns that no alias finds; the error without it says so."""
    path = write_parquet(tmp_path / "shard.parquet", {"q_text": ["q0"], "gold": ["a0"], "why": ["r0"]})
    with pytest.raises(ValueError, match=r"no column for question, answer, reasoning \(found: q_text, gold, why;"
                                         r".*--rgen-columns question=COL,answer=COL,reasoning=COL\)"):
        list(readers.iter_reasoning_gen(path))
    columns = readers.parse_rgen_columns("question=q_text, answer=gold,reasoning=why")
    assert columns == {"question": "q_text", "answer": "gold", "reasoning": "why"}
    assert list(readers.iter_reasoning_gen(path, columns=columns)) == [
        {"id": 0, "question": "q0", "answer": "a0", "reasoning": "r0"}]
    with pytest.raises(ValueError, match=r"shard.parquet: no column 'reason' for reasoning \(found: q_text, gold, why\)"):
        list(readers.iter_reasoning_gen(path, columns={**columns, "reasoning": "reason"}))
    for bad in ("question", "label=gold", "answer="):
        with pytest.raises(ValueError, match=f"--rgen-columns: '{bad}' is not ROLE=COLUMN"):
            readers.parse_rgen_columns(bad)
    assert readers.parse_rgen_columns("") == {}


def test_iter_reasoning_gen_wrong_columns_and_bad_rows(tmp_path, capsys):
    path = write_parquet(tmp_path / "a" / "train-00000-of-00001.parquet", {"question": ["q"], "label": ["a"]})
    with pytest.raises(ValueError, match=f"{path}: no column for answer, reasoning \\(found: question, label;"):
        list(readers.iter_reasoning_gen(tmp_path / "a"))
    columns = rgen_columns(0, 4)
    columns["answer"][1] = None
    columns["reasoning"][2] = "  "
    path = write_parquet(tmp_path / "b" / "train-00000-of-00001.parquet", columns)
    with pytest.raises(ValueError, match=f"{path}: row 2: missing answer \\(column 'answer'\\)"):
        list(readers.iter_reasoning_gen(path))
    stream = readers.iter_reasoning_gen(tmp_path / "b", skip_bad=True)
    assert [r["id"] for r in stream] == [0, 3] and stream.skipped == 2
    assert "skipped 2 bad row(s) of 4; the first: row 2: missing answer" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .parquet or .jsonl files"):
        readers.iter_reasoning_gen(tmp_path / "empty")


def test_write_reasoning_gen_demo_round_trip(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    rows = [{"question": f"q{i}", "answer": f"a{i}", "reasoning": f"r{i}"} for i in range(5)]
    folder = write_reasoning_gen_demo(tmp_path / "pq", rows, shards=2)
    assert sorted(p.name for p in (folder / "data").iterdir()) == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert [{k: r[k] for k in ("question", "answer", "reasoning")} for r in readers.iter_reasoning_gen(folder)] == rows
    monkeypatch.setitem(sys.modules, "pyarrow", None)      # without pyarrow the demo runs on jsonl
    folder = write_reasoning_gen_demo(tmp_path / "jsonl", rows)
    assert [p.name for p in (folder / "data").iterdir()] == ["train.jsonl"]
    assert [r["reasoning"] for r in readers.iter_reasoning_gen(folder, max_examples=2)] == ["r0", "r2"]


# ----------------------------------------------------------------------------- augmented

def test_read_augmented(tmp_path):
    path = tmp_path / "augmented.jsonl"
    good = {"id": 3, "text": "i am scared", "label": 4, "reasoning": "The dark scares them.", "n_tokens": 6}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": 4, "reasoning": ""}) + "\n"
                    + json.dumps({"id": 5, "text": "x", "label": "joy"}) + "\n")
    with pytest.raises(ValueError, match=f"{path}: line 2: empty reasoning"):
        readers.read_augmented(path)
    rows = readers.read_augmented(path, skip_bad=True)
    assert list(rows) == [{**good, "label": "fear"}] and rows.skipped == 2
    with pytest.raises(FileNotFoundError, match="no such file"):
        readers.read_augmented(tmp_path / "missing.jsonl")
    assert rows.settings == {}
    write_json(readers.settings_path(path), {"max_new_tokens": 64, "split": "train"})
    assert readers.read_augmented(path, skip_bad=True).settings == {"max_new_tokens": 64, "split": "train"}
