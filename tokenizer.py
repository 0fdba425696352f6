"""The tokenizer and the chat format: how a conversation becomes token ids, and which of them
training learns.

    Tokenizer            a checkpoint's tokenizer.json + tokenizer_config.json; render() turns a
                         conversation into ids and a mask of the tokens that training learns;
                         serving_files() what every checkpoint we save carries
    build_tokenizer      a small byte-level BPE with the same layout, for the CPU demo and the tests

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
so they always see identical prompts, and every checkpoint we save carries a template that
writes the same (serving_files). (2) The BOS token is written by render() and nowhere else:
encode() never adds special tokens, so there is never a double BOS.

References: Meta's Llama 3 prompt format (llama-models), the ChatML format (OpenAI, as used by
Qwen and SmolLM2).
"""
from __future__ import annotations

import json
from pathlib import Path

import tokenizers

from files import read_json, write_atomic

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
        self.config = read_json(folder / "tokenizer_config.json")

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
                eos = read_json(folder / name).get("eos_token_id")
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
