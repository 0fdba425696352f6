"""Data: the tokenizer and chat format, the three tasks' prompts, and the dataset readers.

    Tokenizer            a checkpoint's tokenizer.json + tokenizer_config.json; render() turns a
                         conversation into ids and a mask of the tokens that training learns
    build_tokenizer      a small byte-level BPE with the same layout, for the CPU demo and the tests
    prompt_messages ...  the tasks: rgen (stage 1, question + answer -> reasoning), q2a (text ->
                         label) and q2ra (text -> reasoning, then "Emotion: <label>")
    read_emotion ...     dair-ai/emotion in its hub layouts, syvai/reasoning-gen streamed shard by
                         shard, and stage 2's augmented jsonl
    encode_example       one training example: ids, target mask, and how it was fitted to the
                         length limit (a classifier never loses its label)
    reply_budget         the max_new_tokens that a task's replies need, end-of-turn included

Chat formats. render() writes the format itself instead of running the checkpoint's jinja
template, so that the mask is exact: text between special tokens is encoded the way the
tokenizer encodes it inside a whole string (special tokens always split the text, so this is
what transformers' `apply_chat_template(messages, tokenize=True)` gives for the templates
below; the tests check it), and the mask is True exactly on each assistant reply's tokens and
its end-of-turn token (<|eot_id|> / <|im_end|>), which must stay in the loss or the model never
learns to stop.

    llama3   <|begin_of_text|> once, then per message
             <|start_header_id|>{role}<|end_header_id|>\\n\\n{content, stripped}<|eot_id|>
             generation prompt: <|start_header_id|>assistant<|end_header_id|>\\n\\n
    chatml   <|im_start|>{role}\\n{content}<|im_end|>\\n per message, no BOS
             generation prompt: <|im_start|>assistant\\n

DECISIONS. (1) No "Cutting Knowledge Date / Today Date" system lines, which Llama 3.2's own
template adds, and no default system prompt, which SmolLM2's adds when none is given: a system
turn appears only when the messages have one. Training and inference both go through render(),
so they always see identical prompts. (2) The BOS token is written by render() and nowhere
else: encode() never adds special tokens, so there is never a double BOS.

Readers raise a one-line ValueError naming the file and the row (1-based: "line N" in jsonl,
"row N" in csv and parquet) on bad data. With skip_bad=True bad rows are left out instead: the
lists returned are `Rows` and the stream a `RowStream`, both with a `skipped` count, and each
file with bad rows prints one warning to stderr.

References: Meta's Llama 3 prompt format (llama-models), the ChatML format (OpenAI, as used by
Qwen and SmolLM2), Saravia et al. 2018 (the emotion dataset, CARER).
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import re
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import tokenizers

# ----------------------------------------------------------------------------- tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CHAT_TOKENS = {  # the special tokens each chat format is written with (build_tokenizer adds these)
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>", "<|eom_id|>", "<|finetune_right_pad_id|>"],
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}
END_TOKENS = {  # every token that ends a turn or the text; generation stops on any of them
    "llama3": ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"],
    "chatml": ["<|im_end|>", "<|endoftext|>"],
}
TEXT_END_TOKENS = ("<|end_of_text|>", "<|endoftext|>")


class Tokenizer:
    """A Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json) and its chat format.

    chat_format   "llama3" or "chatml", picked from the special tokens present
    special       name -> id of every added token (tokenizer.json and tokenizer_config.json)
    bos_id        the BOS token's id (None for chatml checkpoints without one)
    stop_ids      every end-of-turn / end-of-text id: the format's END_TOKENS, plus the eos ids
                  named by tokenizer_config.json, generation_config.json and config.json
    pad_id        the pad token if the checkpoint names one, else the end-of-text id. Padding is
                  masked out everywhere, so sharing an id with an end token is harmless: the reply's
                  own end-of-turn token is in the target mask by position, not by id
    tk            the underlying tokenizers.Tokenizer
    """

    def __init__(self, folder):
        folder = Path(folder)
        self.folder = folder
        for name in TOKENIZER_FILES:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name}: no such file (a tokenizer folder needs "
                                        f"{' and '.join(TOKENIZER_FILES)})")
        self.tokenizer_json = (folder / "tokenizer.json").read_bytes()  # saved unchanged with every checkpoint
        try:
            self.tk = tokenizers.Tokenizer.from_str(self.tokenizer_json.decode("utf-8"))
        except Exception as e:  # tokenizers raises its own exception type
            raise ValueError(f"{folder / 'tokenizer.json'}: not a valid tokenizer ({e})") from None
        self.config = _read_json(folder / "tokenizer_config.json")

        self.special = {t.content: i for i, t in self.tk.get_added_tokens_decoder().items()}
        for i, entry in self.config.get("added_tokens_decoder", {}).items():
            self.special.setdefault(entry["content"], int(i))
        if "<|start_header_id|>" in self.special and "<|eot_id|>" in self.special:
            self.chat_format = "llama3"
        elif "<|im_start|>" in self.special and "<|im_end|>" in self.special:
            self.chat_format = "chatml"
        else:
            raise ValueError(f"{folder}: unknown chat format (no <|start_header_id|>/<|eot_id|> "
                             f"tokens for llama3, no <|im_start|>/<|im_end|> for chatml)")

        self.bos_id = self._config_token_id("bos_token")
        eos_id = self._config_token_id("eos_token")
        self.stop_ids = {self.special[name] for name in END_TOKENS[self.chat_format] if name in self.special}
        self.stop_ids |= {eos_id} if eos_id is not None else set()
        for name in ("generation_config.json", "config.json"):  # present in model folders
            if (folder / name).is_file():
                eos = _read_json(folder / name).get("eos_token_id")
                self.stop_ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        candidates = [self._config_token_id("pad_token"), *(self.special.get(name) for name in TEXT_END_TOKENS),
                      eos_id, self.special[END_TOKENS[self.chat_format][0]]]
        self.pad_id = next(i for i in candidates if i is not None)

    def _config_token_id(self, key: str) -> int | None:
        name = self.config.get(key)
        name = name.get("content") if isinstance(name, dict) else name  # older configs store a dict
        if name is None:
            return None
        token_id = self.special.get(name, self.tk.token_to_id(name))
        if token_id is None:
            raise ValueError(f"{self.folder / 'tokenizer_config.json'}: {key} {name!r} is not in the vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=True)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """ids of the conversation in the checkpoint's chat format, and a mask that is True exactly
        on every assistant reply's tokens and its end-of-turn token."""
        ids, mask = [], []

        def special(name, target=False):
            ids.append(self.special[name])
            mask.append(target)

        def text(prefix, content="", target=False):
            # One stretch of text between two special tokens, encoded whole as the tokenizer would
            # inside the full string; the content's tokens are those that end past the prefix.
            enc = self.tk.encode(prefix + content, add_special_tokens=False)
            ids.extend(enc.ids)
            mask.extend(target and end > len(prefix) for _, end in enc.offsets)

        if self.chat_format == "llama3":
            special("<|begin_of_text|>")
            for m in messages:
                reply = m["role"] == "assistant"
                special("<|start_header_id|>")
                text(m["role"])
                special("<|end_header_id|>")
                text("\n\n", m["content"].strip(), reply)
                special("<|eot_id|>", reply)
            if add_generation_prompt:
                special("<|start_header_id|>")
                text("assistant")
                special("<|end_header_id|>")
                text("\n\n")
        else:
            for m in messages:
                reply = m["role"] == "assistant"
                special("<|im_start|>")
                text(m["role"] + "\n", m["content"], reply)
                special("<|im_end|>", reply)
                text("\n")
            if add_generation_prompt:
                special("<|im_start|>")
                text("assistant\n")
        return ids, mask

    def serving_files(self, max_new_tokens: int | None = None) -> dict[str, str | bytes]:
        """The files a checkpoint carries so that any server feeds it the prompts it was trained
        on: tokenizer.json as loaded; tokenizer_config.json with a chat_template that writes
        exactly what render() writes (replacing the base model's, which for Llama 3.2 adds the
        date lines we never train with); generation_config.json with every stop id as
        eos_token_id, greedy decoding and, when given, the reply budget as max_new_tokens."""
        config = {**self.config, "chat_template": CHAT_TEMPLATES[self.chat_format]}
        generation = {"bos_token_id": self.bos_id, "eos_token_id": sorted(self.stop_ids),
                      "pad_token_id": self.pad_id, "do_sample": False}
        if max_new_tokens is not None:
            generation["max_new_tokens"] = max_new_tokens
        return {"tokenizer.json": self.tokenizer_json,
                "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                "generation_config.json": json.dumps(generation, indent=2) + "\n"}

    def save(self, out_dir, max_new_tokens: int | None = None) -> Path:
        """Write serving_files() to out_dir."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, content in self.serving_files(max_new_tokens).items():
            write_atomic(out_dir / name, content)
        return out_dir


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def write_atomic(path, content) -> None:
    """Write `content` (str, bytes, or a function that writes the temporary path it is given)
    to a temporary file in the same folder, fsync it, then os.replace it over `path`: a reader,
    or a run killed at any moment, only ever sees the old file or the new one, whole.
    Every file this project writes goes through here."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        if callable(content):
            content(tmp)
        else:
            tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave it empty
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj) -> None:
    """obj as indented JSON (one trailing newline), written atomically."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


# ----------------------------------------------------------------------------- a small tokenizer

# jinja templates that write exactly what Tokenizer.render writes, so that transformers'
# apply_chat_template (and the chat endpoints of serving engines) give the same ids: every
# checkpoint we save carries its format's template (Tokenizer.serving_files)
CHAT_TEMPLATES = {
    "llama3": ("{{- '<|begin_of_text|>' }}{%- for message in messages %}"
               "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim)"
               " + '<|eot_id|>' }}{%- endfor %}"
               "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"),
    "chatml": ("{%- for message in messages %}"
               "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}"
               "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"),
}
# bos, eos, pad as the hub's checkpoints name them (Llama 3.2 Instruct; Qwen2.5 Instruct for chatml)
CONFIG_TOKENS = {"llama3": ("<|begin_of_text|>", "<|eot_id|>", None),
                 "chatml": (None, "<|im_end|>", "<|endoftext|>")}


def build_tokenizer(texts, out_dir, chat_format: str = "llama3", vocab_size: int = 512) -> Path:
    """Train a byte-level BPE on `texts` (deterministic), append the chat format's special tokens
    after it (as Llama 3 does, ids vocab..vocab+k) and write tokenizer.json + tokenizer_config.json
    to out_dir in the hub's layout. vocab_size bounds the learned vocabulary (256 bytes + merges)."""
    if chat_format not in CHAT_TOKENS:
        raise ValueError(f"chat_format '{chat_format}' is not one of {', '.join(CHAT_TOKENS)}")
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # no space glued to each segment
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(list(texts), trainer)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS[chat_format]])
    bos, eos, pad = CONFIG_TOKENS[chat_format]
    post = [processors.ByteLevel(trim_offsets=False)]
    if bos:  # like Llama 3's tokenizer.json: encoding with special tokens adds BOS (render() never asks to)
        post.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                  special_tokens=[(bos, tk.token_to_id(bos))]))
    tk.post_processor = processors.Sequence(post)

    added = {i: t for i, t in tk.get_added_tokens_decoder().items()}
    config = {
        "added_tokens_decoder": {str(i): {"content": t.content, "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False, "special": True}
                                 for i, t in sorted(added.items())},
        "bos_token": bos,
        "chat_template": CHAT_TEMPLATES[chat_format],
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "pad_token": pad,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "tokenizer.json", tk.to_str(pretty=True))
    write_atomic(out_dir / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out_dir


# ----------------------------------------------------------------------------- tasks

LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]  # dair-ai/emotion's id order
TASKS = ("rgen", "q2a", "q2ra")
ANSWER_PREFIX = "Emotion:"  # q2ra's last line is exactly "Emotion: <label>"; eval.py parses it
PROMPT_VERSION = "v1"       # bump whenever a wording below changes: trained models depend on it
DEFAULT_REASONING_TOKENS = 256  # stage 2's cap on a reasoning's length (new tokens)

RGEN_PROMPT = ("Write the reasoning that leads from the question to the answer.\n\n"
               "Question: {question}\n\nAnswer: {answer}")
EMOTION_QUESTION = "What emotion does this text express? Choose one of: {labels}.\n\nText: {text}"
CLASSIFY_PROMPT = "Classify the emotion expressed in the text as one of: {labels}.\n\nText: {text}"


def _field(row: dict, name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"row {row.get('id', '?')}: field '{name}' is missing or empty")
    return value


def _label(row: dict) -> str:
    if row.get("label") not in LABELS:
        raise ValueError(f"row {row.get('id', '?')}: label {row.get('label')!r} is not one of {', '.join(LABELS)}")
    return row["label"]


def emotion_as_rgen(row: dict) -> dict:
    """An emotion row as a stage-1 question/answer pair, for stage 2 to write its reasoning."""
    question = EMOTION_QUESTION.format(labels=", ".join(LABELS), text=_field(row, "text"))
    return {"id": row.get("id"), "question": question, "answer": _label(row)}


def prompt_messages(task: str, row: dict) -> list[dict]:
    """The user turn of a task (no system turn). q2a and q2ra share it word for word, so the two
    classifiers differ only in what they learn to answer."""
    if task == "rgen":
        content = RGEN_PROMPT.format(question=_field(row, "question").strip(), answer=_field(row, "answer").strip())
    elif task in ("q2a", "q2ra"):
        content = CLASSIFY_PROMPT.format(labels=", ".join(LABELS), text=_field(row, "text").strip())
    else:
        raise ValueError(f"unknown task '{task}' (expected one of {', '.join(TASKS)})")
    return [{"role": "user", "content": content}]


def target_text(task: str, row: dict) -> str:
    """The assistant's reply: rgen the reasoning; q2a the label; q2ra the reasoning, then
    a last line "Emotion: <label>"."""
    if task == "rgen":
        return _field(row, "reasoning").strip()
    if task == "q2a":
        return _label(row)
    if task == "q2ra":
        return f"{_field(row, 'reasoning').strip()}\n{answer_line(_label(row))}"
    raise ValueError(f"unknown task '{task}' (expected one of {', '.join(TASKS)})")


def example_messages(task: str, row: dict) -> list[dict]:
    return prompt_messages(task, row) + [{"role": "assistant", "content": target_text(task, row)}]


def encode_example(tokenizer: Tokenizer, task: str, row: dict, max_seq_len: int) -> dict:
    """ids and target mask of one training example, at most max_seq_len tokens, and how it was
    made to fit: "whole"; "cut" (rgen: cut from the right, the reasoning loses its end);
    "shortened" (q2ra: the reasoning loses its last tokens, so that the answer line and the
    end-of-turn token stay); "dropped" (a classifier whose label cannot stay: ids are empty).
    A classifier never trains on a reply cut before its label: it would learn not to answer."""
    ids, mask = tokenizer.render(example_messages(task, row))
    if len(ids) <= max_seq_len:
        return {"input_ids": ids, "target_mask": mask, "fit": "whole"}
    if task == "rgen":
        fit = "cut" if any(mask[:max_seq_len]) else "dropped"
        return {"input_ids": ids[:max_seq_len], "target_mask": mask[:max_seq_len], "fit": fit}
    if task == "q2ra":
        reasoning = tokenizer.encode(_field(row, "reasoning").strip())
        keep = len(reasoning) - (len(ids) - max_seq_len)
        while keep > 0:  # re-encoding the shortened text can merge tokens differently: check, retry
            shorter = tokenizer.decode(reasoning[:keep]).strip()
            if not shorter:
                break
            ids, mask = tokenizer.render(example_messages(task, {**row, "reasoning": shorter}))
            if len(ids) <= max_seq_len:
                return {"input_ids": ids, "target_mask": mask, "fit": "shortened"}
            keep -= len(ids) - max_seq_len
    return {"input_ids": [], "target_mask": [], "fit": "dropped"}


def answer_line(label: str) -> str:
    """The q2ra target's last line."""
    return f"{ANSWER_PREFIX} {label}"


def reply_budget(tokenizer: Tokenizer, task: str, reasoning_tokens: int = DEFAULT_REASONING_TOKENS) -> int:
    """max_new_tokens that a reply of `task` needs, its end-of-turn token included, so that a
    model that reproduces its training targets is never cut off: q2ra, the stage-2 reasoning
    cap (reasoning_tokens) plus the longest answer line; q2a, the longest label; rgen, the
    reasoning cap."""
    if task == "rgen":
        return reasoning_tokens
    if task == "q2a":  # room for a few words around the label, as a stray "Emotion: joy."
        return max(8, 1 + max(len(tokenizer.encode(label)) for label in LABELS))
    if task == "q2ra":
        return reasoning_tokens + 1 + max(len(tokenizer.encode("\n" + answer_line(label))) for label in LABELS)
    raise ValueError(f"unknown task '{task}' (expected one of {', '.join(TASKS)})")


# ----------------------------------------------------------------------------- readers

class Rows(list):
    """A list of rows; `skipped` counts the bad rows that skip_bad=True left out."""
    skipped = 0
    settings: dict = {}  # read_augmented: stage 2's settings


class RowStream:
    """An iterator of rows read lazily, at most `limit`; `skipped` counts the bad rows left out so far."""

    def __init__(self, items: Iterator, limit: int | None = None):
        self._items, self._left, self.skipped = items, limit, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._left is not None and self._left <= 0:
            raise StopIteration  # so the files after this one are never opened
        while (item := next(self._items)) is _SKIPPED:
            self.skipped += 1
        if self._left is not None:
            self._left -= 1
        return item


class _BadRow(Exception):
    pass


_SKIPPED = object()  # what a skipped bad row becomes on its way to RowStream


def _parquet_file(path: Path):
    try:
        import pyarrow
        import pyarrow.parquet as pq  # optional: only parquet files need it
    except ImportError:
        raise ModuleNotFoundError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        return pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None


def _columns(path: Path) -> list[str] | None:
    """The column names of a parquet or csv file; None for jsonl, whose rows each carry their own."""
    if path.name.endswith(".parquet"):
        return _parquet_file(path).schema_arrow.names
    if path.name.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), [])
    return None


def _records(path: Path, columns: list[str] | None = None) -> Iterator[tuple[str, dict | None]]:
    """(where, record) for each row of a .parquet, .csv or .jsonl(.gz) file; where is "row N"
    or "line N" (1-based); record is None for a line that is not a JSON object."""
    name = path.name
    if name.endswith(".parquet"):  # batch by batch: a 215 MB shard is never in memory whole
        n = 0
        for batch in _parquet_file(path).iter_batches(batch_size=1024, columns=columns):
            for record in batch.to_pylist():
                n += 1
                yield f"row {n}", record
    elif name.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            for n, record in enumerate(csv.DictReader(f), 1):
                yield f"row {n}", record
    elif name.endswith((".jsonl", ".jsonl.gz")):
        with (gzip.open(path, "rt", encoding="utf-8") if name.endswith(".gz") else open(path, encoding="utf-8")) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        record = None
                    yield f"line {n}", record if isinstance(record, dict) else None
    else:
        raise ValueError(f"{path}: unknown file type (expected .parquet, .csv, .jsonl or .jsonl.gz)")


def _parse_file(path: Path, parse: Callable[[dict, int], dict], skip_bad: bool, first_index: int,
                columns: list[str] | None, wanted: Callable[[int], bool] | None = None):
    """Yield parse(record, index) for each row of one file, index counting every row (bad ones
    too) from first_index; return the number of rows. A bad row raises a one-line ValueError
    naming the file and row, or with skip_bad yields _SKIPPED (and the file gets one warning).
    wanted(index) False: the row is passed over unread (a bad one there is no error)."""
    n, n_bad, first_bad = 0, 0, None
    for where, record in _records(path, columns):
        if wanted is not None and not wanted(first_index + n):
            n += 1
            continue
        try:
            if record is None:
                raise _BadRow("not a JSON object")
            yield parse(record, first_index + n)
        except _BadRow as e:
            if not skip_bad:
                raise ValueError(f"{path}: {where}: {e} (skip_bad=True leaves bad rows out)") from None
            n_bad, first_bad = n_bad + 1, first_bad or f"{where}: {e}"
            yield _SKIPPED
        n += 1
    if n_bad:
        print(f"{path}: skipped {n_bad} bad row(s) of {n}; the first: {first_bad}", file=sys.stderr)
    return n


def _parse_files(files: list[Path], parser_for: Callable, skip_bad: bool, wanted=None):
    """_parse_file over several files (shards); parser_for(file) -> (parse, columns to read) is
    called only when the file's turn comes. Row indices continue across files."""
    index = 0
    for file in files:
        parse, columns = parser_for(file)
        index += yield from _parse_file(file, parse, skip_bad, index, columns, wanted)


def _collect(stream: RowStream) -> Rows:
    rows = Rows(stream)
    rows.skipped = stream.skipped
    return rows


def _local_or_download(source, **patterns) -> Path:
    """source as a local path; a hub dataset id (owner/name) is downloaded once into the HF cache."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    hub_id = re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", str(source)) and not str(source).endswith(
        (".jsonl", ".gz", ".csv", ".parquet", ".json"))
    if not hub_id:
        raise FileNotFoundError(f"{source}: no such file or folder")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(source), repo_type="dataset", **patterns))
    except Exception as e:  # offline, no such dataset, or gated
        first_line = (str(e).splitlines() or [""])[0]
        raise RuntimeError(f"{source}: not a local path, and downloading it from the Hugging Face hub failed "
                           f"(offline? {type(e).__name__}: {first_line})") from None


# ----------------------------------------------------------------------------- emotion

EMOTION_SPLITS = ("train", "validation", "test")


def _label_name(value) -> str | None:
    """A label id 0-5 (int or digits) or name (any case) as its LABELS name; None if neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return LABELS[value] if 0 <= value < len(LABELS) else None
    if isinstance(value, str):
        value = value.strip().lower()
        return _label_name(int(value)) if value.isdigit() else value if value in LABELS else None
    return None


def _emotion_row(record: dict, index: int, extra: tuple[str, ...] = ()) -> dict:
    """The record with label as a LABELS name and an id (its own, else index); _BadRow if unusable."""
    for name in ("text", "label") + extra:
        if record.get(name) is None:
            raise _BadRow(f"missing field '{name}' (found: {', '.join(record) or 'nothing'})")
    if not isinstance(record["text"], str) or not record["text"].strip():
        raise _BadRow("empty text")
    label = _label_name(record["label"])
    if label is None:
        raise _BadRow(f"unknown label {record['label']!r} (expected 0-5 or one of {', '.join(LABELS)})")
    for name in extra:
        if not isinstance(record[name], str) or not record[name].strip():
            raise _BadRow(f"empty {name}")
    return {**record, "id": record["id"] if record.get("id") is not None else index, "label": label}


def _emotion_files(folder: Path, split: str) -> list[Path]:
    # The hub's "split" config (split/), an export or mirror (data/), a config folder itself
    # (point at .../unsplit to read that config: its 417k rows overlap the split config's test
    # set, so it is never picked implicitly), the older data/{split}.jsonl.gz, and plain files.
    patterns = [f"split/{split}-*.parquet", f"data/{split}-*.parquet", f"{split}-*.parquet",
                f"data/{split}.jsonl.gz", f"{split}.jsonl", f"{split}.jsonl.gz", f"{split}.csv", f"{split}.parquet"]
    for pattern in patterns:
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"{folder}: no '{split}' split here (looked for {', '.join(patterns)})")


def read_emotion(source, split: str, skip_bad: bool = False) -> Rows:
    """dair-ai/emotion rows {id, text, label}: label a LABELS name, id the file's id column or
    else the row's index in the split. source: a folder in one of the hub's layouts (see
    _emotion_files), a single .parquet/.jsonl(.gz)/.csv file (which is the split), or a hub id.
    Labels may be ids 0-5 or names."""
    if split not in EMOTION_SPLITS:
        raise ValueError(f"split '{split}' is not one of {', '.join(EMOTION_SPLITS)}")
    path = _local_or_download(source, ignore_patterns=["unsplit/*"])  # 27 MB we would never read
    files = [path] if path.is_file() else _emotion_files(path, split)
    for file in files:  # checked up front: wrong columns are the file's fault, never skipped
        found = _columns(file)
        if found is not None and not {"text", "label"} <= set(found):
            raise ValueError(f"{file}: expected columns text and label, found: {', '.join(found) or 'none'}")

    def parse(record, index):
        row = _emotion_row(record, index)
        return {"id": row["id"], "text": row["text"], "label": row["label"]}
    return _collect(RowStream(_parse_files(files, lambda file: (parse, None), skip_bad)))


def read_augmented(path, skip_bad: bool = False) -> Rows:
    """Stage 2's output: jsonl rows {id, text, label, reasoning, ...}, every field kept, label as
    a name; `settings` holds what stage 2 ran with (its sidecar, see settings_path; {} without)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")

    def parse(record, index):
        return _emotion_row(record, index, extra=("reasoning",))
    rows = _collect(RowStream(_parse_files([path], lambda file: (parse, None), skip_bad)))
    rows.settings = _read_json(settings_path(path)) if settings_path(path).is_file() else {}
    return rows


def settings_path(jsonl) -> Path:
    """Where stage 2 records the settings of an output file: OUT.jsonl -> OUT.jsonl.meta.json."""
    jsonl = Path(jsonl)
    return jsonl.with_name(jsonl.name + ".meta.json")


# ----------------------------------------------------------------------------- reasoning-gen

# syvai/reasoning-gen's columns are read from each file and matched by name to these roles.
# (Its dataset card is not in our references; the paper names the parts question, answer and
# reasoning, so we accept those and the usual aliases, and name the columns found otherwise.)
RGEN_COLUMNS = {
    "question": ("question", "prompt", "instruction", "input", "query", "problem"),
    "answer": ("answer", "response", "output", "completion", "final_answer", "solution"),
    "reasoning": ("reasoning", "rationale", "thinking", "thoughts", "thought", "explanation", "chain_of_thought", "cot"),
}


def _rgen_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    for pattern in ("**/train-*.parquet", "**/*.parquet", "**/*.jsonl", "**/*.jsonl.gz"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"{path}: no .parquet or .jsonl files here")


def parse_rgen_columns(spec: str) -> dict[str, str]:
    """"question=COL,answer=COL,reasoning=COL" (any of the three roles) as {role: column}."""
    columns = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        role, _, column = part.partition("=")
        if role.strip() not in RGEN_COLUMNS or not column.strip():
            raise ValueError(f"--rgen-columns: '{part}' is not ROLE=COLUMN with ROLE one of {', '.join(RGEN_COLUMNS)}")
        columns[role.strip()] = column.strip()
    return columns


def _rgen_parser(file: Path, chosen: dict[str, str]):
    """The row parser for one reasoning-gen file and the columns it reads: the columns chosen
    by role (--rgen-columns), else the first alias of each role among the file's columns."""
    found = _columns(file)
    if found is None:  # jsonl: the first record's keys
        found = next((list(record) for _, record in _records(file) if record is not None), [])
    by_lower = {name.lower(): name for name in found}
    columns = {role: chosen.get(role) or next((by_lower[a] for a in aliases if a in by_lower), None)
               for role, aliases in RGEN_COLUMNS.items()}
    for role, column in chosen.items():
        if column not in found:
            raise ValueError(f"{file}: no column '{column}' for {role} (found: {', '.join(found) or 'none'})")
    missing = [role for role, column in columns.items() if column is None]
    if missing:
        raise ValueError(f"{file}: no column for {', '.join(missing)} (found: {', '.join(found) or 'none'}; "
                         f"accepted: {'; '.join('/'.join(a) for a in RGEN_COLUMNS.values())}; name them with "
                         f"--rgen-columns question=COL,answer=COL,reasoning=COL)")
    id_column = by_lower.get("id")

    def parse(record, index):
        row = {"id": record.get(id_column) if id_column else None}
        for role, column in columns.items():
            value = record.get(column)
            if not isinstance(value, str) or not value.strip():
                raise _BadRow(f"{'missing' if value is None else 'empty'} {role} (column '{column}')")
            row[role] = value
        row["id"] = index if row["id"] is None else row["id"]
        return row
    return parse, list(columns.values()) + ([id_column] if id_column else [])


def iter_reasoning_gen(source, max_examples: int | None = None, skip_bad: bool = False,
                       columns: dict[str, str] | None = None) -> RowStream:
    """syvai/reasoning-gen rows {id, question, answer, reasoning}, streamed shard by shard and
    batch by batch (the real set is ~350k rows of math, code and science in ~215 MB parquet
    shards). max_examples: that many rows spread evenly over all shards (rows i * total // n),
    not the first ones, which would all come from one part of the set if its shards are grouped
    by domain. source: folder, file or hub id. id is the file's id column, else the row's index
    over all shards. columns: {role: column name} for roles whose column has no known alias."""
    files = _rgen_files(_local_or_download(source))
    wanted = None
    if max_examples:
        total = sum(_row_count(f) for f in files)
        if total > max_examples:
            picked = {i * total // max_examples for i in range(max_examples)}
            wanted = picked.__contains__
    return RowStream(_parse_files(files, partial(_rgen_parser, chosen=columns or {}), skip_bad, wanted), max_examples)


def _row_count(path: Path) -> int:
    """Rows of a file as _records counts them: a parquet file's from its footer, no data read."""
    if path.name.endswith(".parquet"):
        return _parquet_file(path).metadata.num_rows
    return sum(1 for _ in _records(path))


def write_reasoning_gen_demo(folder, rows: list[dict], shards: int = 2) -> Path:
    """Write rows {question, answer, reasoning} in reasoning-gen's layout,
    folder/data/train-0000i-of-0000N.parquet (or folder/data/train.jsonl without pyarrow)."""
    data = Path(folder) / "data"
    data.mkdir(parents=True, exist_ok=True)
    columns = ["question", "answer", "reasoning"]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pyarrow is optional: the demo then runs on jsonl
        write_atomic(data / "train.jsonl", "".join(json.dumps({c: r[c] for c in columns}) + "\n" for r in rows))
        return Path(folder)
    shards = max(1, min(shards, len(rows)))
    per_shard = -(-len(rows) // shards)
    for i in range(shards):
        part = rows[i * per_shard:(i + 1) * per_shard]
        table = pa.table({c: [r[c] for r in part] for c in columns})
        write_atomic(data / f"train-{i:05d}-of-{shards:05d}.parquet", lambda tmp: pq.write_table(table, tmp))
    return Path(folder)
