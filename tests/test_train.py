"""train.py on tiny random models, on CPU: the loss positions, gradient accumulation, parity with
transformers' loss, overfitting, exact resume (in process, after SIGINT and after SIGKILL),
and the CLI end to end (the optimizer and the schedule: test_optim.py).

Everything is built in tmp dirs (tokenizers by build_tokenizer, models by tiny.tiny_llama):
no downloads. Torch runs on one thread here: tiny matmuls are faster that way on a shared 2-core
machine, and the subprocesses get the same setting so that their losses compare bit for bit.
"""
import json
import random
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import labelset
import loss
import memory
import runs
import readers
from files import write_json
import train
import checkpoint
from tokenizer import Tokenizer
from helpers import cli_args, metrics, run_config, start_script, trajectory, wait_for
from tiny import EMOTION_WORDS, tiny_llama, write_jsonl
from train import TrainConfig

END_OF_TURN = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}


def examples_of(task: str, tokenizer, rows, max_seq_len=512) -> list[data.Example]:
    return data.encode(task, tokenizer, rows, max_seq_len, "test")[0]


def load_examples(cfg: TrainConfig, tokenizer):
    """data.load_examples with a training run's settings, as train.setup calls it."""
    return data.load_examples(cfg.task, cfg.data, tokenizer, cfg.max_seq_len, cfg.max_examples, cfg.val_examples,
                              cfg.val_data, cfg.seed, cfg.skip_bad, cfg.rgen_columns)


def grads(model, micro_batches):
    model.zero_grad(set_to_none=True)
    step_loss = loss.forward_backward(model, micro_batches, autocast=False)
    return step_loss, [p.grad.clone() for p in model.parameters()]


# ----------------------------------------------------------------------------- loss positions

@pytest.mark.parametrize("chat_format", ["llama3", "chatml"])
@pytest.mark.parametrize("task", data.TASKS)
def test_loss_positions_predict_exactly_the_reply(assets, task, chat_format):
    """Through encode_example, right padding and the shift by one: the tokens that get a loss,
    decoded, are exactly the assistant's reply and its end-of-turn token, for every row."""
    tokenizer = Tokenizer(assets.model[chat_format])
    rows = assets.rgen_rows[:4] if task == "rgen" else assets.rows[:4]
    batch = data.collate(examples_of(task, tokenizer, rows), tokenizer.pad_id)
    T = batch.input_ids.shape[1]
    b, t = batch.loss_pos // T, batch.loss_pos % T
    assert torch.equal(batch.input_ids[b, t + 1], batch.targets)  # position t predicts token t + 1
    lengths = {len(examples_of(task, tokenizer, [row])[0].ids) for row in rows}
    assert len(lengths) > 1  # the batch really is padded
    for i, row in enumerate(rows):
        reply = tokenizer.tk.decode(batch.targets[b == i].tolist(), skip_special_tokens=False)
        assert reply == data.target_text(task, row) + END_OF_TURN[chat_format]


def test_truncation_keeps_the_label_and_is_counted(assets, tmp_path):
    """q2ra examples over --max-seq-len lose the end of their reasoning, never their answer line
    or end-of-turn token; those without room for it are dropped; both are counted."""
    tokenizer = Tokenizer(assets.model["llama3"])
    lengths = sorted(len(tokenizer.render(data.example_messages("q2ra", r))[0]) for r in assets.rows[:48])
    limit = lengths[24]  # half the examples are longer
    cfg = TrainConfig(task="q2ra", data=str(assets.augmented), out="", val_examples=4, max_seq_len=limit)
    train_set, val_set, counts = load_examples(cfg, tokenizer)
    longer = sum(n > limit for n in lengths)
    assert {k: counts[k] for k in ("cut_examples", "shortened_examples", "dropped_examples", "skipped_bad_rows")} \
        == {"cut_examples": 0, "shortened_examples": longer, "dropped_examples": 0, "skipped_bad_rows": 0}
    assert len(train_set) + len(val_set) == 48 and max(len(ex.ids) for ex in train_set + val_set) <= limit
    eot = tokenizer.special["<|eot_id|>"]
    for ex in train_set + val_set:
        reply = tokenizer.decode(ex.ids[ex.is_target].tolist())
        assert ex.ids[-1] == eot and ex.is_target[-1] and reply.splitlines()[-1].startswith("Emotion: ")
    # no room for the answer line: dropped (the log says so)
    prompt = max(len(tokenizer.render(data.prompt_messages("q2ra", r), add_generation_prompt=True)[0])
                 for r in assets.rows[:48])
    train_set, val_set, counts = load_examples(replace(cfg, max_seq_len=prompt), tokenizer)
    assert counts["dropped_examples"] > 0 and counts["shortened_examples"] + counts["dropped_examples"] == 48
    assert len(train_set) + len(val_set) == counts["shortened_examples"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(assets.augmented.read_text() + json.dumps({"text": "x", "label": "boredom", "reasoning": "r"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 49"):
        load_examples(replace(cfg, data=str(bad)), tokenizer)
    *_, counts = load_examples(replace(cfg, data=str(bad), skip_bad=True), tokenizer)
    assert counts["skipped_bad_rows"] == 1


def test_validation_rows(assets):
    """The emotion 'validation' split when there is one; a seeded held-out slice of a single file;
    rows spread over the whole reasoning-gen set."""
    tokenizer = Tokenizer(assets.model["llama3"])
    cfg = TrainConfig(task="q2a", data=str(assets.emotion), out="", val_examples=5, max_examples=20)
    train_set, val_set, _ = load_examples(cfg, tokenizer)
    assert len(train_set) == 20 and [ex.ids.tolist() for ex in val_set] == \
        [ex.ids.tolist() for ex in examples_of("q2a", tokenizer, assets.rows[48:53])]

    cfg = replace(cfg, task="q2ra", data=str(assets.augmented), max_examples=0)
    train_set, val_set, _ = load_examples(cfg, tokenizer)
    again = load_examples(cfg, tokenizer)[1]
    other_seed = load_examples(replace(cfg, seed=1), tokenizer)[1]
    all_ids = {tuple(ex.ids.tolist()) for ex in examples_of("q2ra", tokenizer, assets.rows[:48])}
    held_out = {tuple(ex.ids.tolist()) for ex in val_set}
    assert len(train_set) == 43 and len(held_out) == 5 and held_out <= all_ids
    assert held_out.isdisjoint(tuple(ex.ids.tolist()) for ex in train_set)
    assert [ex.ids.tolist() for ex in again] == [ex.ids.tolist() for ex in val_set]
    assert {tuple(ex.ids.tolist()) for ex in other_seed} != held_out

    # --val-data: validation from a separate stage-2 file, every training row trained on
    val_file = assets.augmented.with_name("validation.jsonl")
    val_file.write_text("".join(assets.augmented.read_text().splitlines(keepends=True)[40:]))
    train_set, val_set, _ = load_examples(replace(cfg, val_data=str(val_file), val_examples=3), tokenizer)
    assert len(train_set) == 48 and [ex.ids.tolist() for ex in val_set] == \
        [ex.ids.tolist() for ex in examples_of("q2ra", tokenizer, assets.rows[40:43])]

    # reasoning-gen: 8 + 1 rows spread over the set, and every k-th of them held out
    cfg = replace(cfg, task="rgen", data=str(assets.rgen), max_examples=8, val_examples=1)
    train_set, val_set, _ = load_examples(cfg, tokenizer)
    n = len(assets.rgen_rows)
    expected = examples_of("rgen", tokenizer, [assets.rgen_rows[i * n // 9] for i in range(9)])
    assert n > 9 and len(val_set) == 1
    assert [ex.ids.tolist() for ex in val_set + train_set] == [ex.ids.tolist() for ex in expected]
    train_set, val_set, _ = load_examples(replace(cfg, max_examples=0, val_examples=5), tokenizer)
    assert (len(val_set), len(train_set)) == (2, 10)  # a short stream: a tenth (rounded up) is held out
    every = examples_of("rgen", tokenizer, assets.rgen_rows)
    assert [ex.ids.tolist() for ex in val_set] == [every[0].ids.tolist(), every[6].ids.tolist()]


def test_batch_order_is_seeded_complete_and_length_grouped():
    lengths = [random.Random(i).randint(5, 500) for i in range(400)]
    order = data.batch_order(lengths, batch_size=8, chunk=10, seed=3, epoch=0)
    assert sorted(i for batch in order for i in batch) == list(range(400))
    assert order == data.batch_order(lengths, batch_size=8, chunk=10, seed=3, epoch=0)
    assert order != data.batch_order(lengths, batch_size=8, chunk=10, seed=3, epoch=1)
    assert order != data.batch_order(lengths, batch_size=8, chunk=10, seed=4, epoch=0)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert padding(order) < 0.2 * padding(data.batch_order(lengths, batch_size=8, chunk=1, seed=3, epoch=0))


# ----------------------------------------------------------------------------- loss and gradients

def test_gradient_accumulation_equals_one_big_batch(assets):
    """4 micro-batches of 2 and one batch of 8 (unequal lengths, so each micro-batch has its own
    padding and target count) give the same loss and gradients: atol 1e-6, rtol 1e-5 in fp32."""
    model = checkpoint.load_model(assets.model["llama3"])
    tokenizer = Tokenizer(assets.model["llama3"])
    examples = examples_of("q2ra", tokenizer, assets.rows[:8])
    assert len({len(ex.ids) for ex in examples}) >= 4
    big = [data.collate(examples, tokenizer.pad_id)]
    micro = [data.collate(examples[i:i + 2], tokenizer.pad_id) for i in range(0, 8, 2)]
    assert len({len(b.targets) for b in micro}) > 1
    loss_big, grads_big = grads(model, big)
    loss_micro, grads_micro = grads(model, micro)
    assert loss_micro == pytest.approx(loss_big, rel=1e-6)
    for g_big, g_micro in zip(grads_big, grads_micro):
        torch.testing.assert_close(g_micro, g_big, atol=1e-6, rtol=1e-5)
    # The tolerance is tight enough to catch the classic mistake: averaging the micro-batch means.
    model.zero_grad(set_to_none=True)
    for b in micro:
        (loss.loss_sum(model, b, False) / len(b.targets) / len(micro)).backward()
    worst = max((p.grad - g).abs().max().item() for p, g in zip(model.parameters(), grads_big))
    assert worst > 100 * 1e-6


@pytest.mark.parametrize("chat_format", ["llama3", "chatml"])
def test_loss_matches_transformers(assets, chat_format):
    """Our masked loss == LlamaForCausalLM's loss on the same saved folder, labels -100 off target."""
    from transformers import LlamaForCausalLM
    folder = assets.model[chat_format]
    tokenizer = Tokenizer(folder)
    batch = data.collate(examples_of("q2ra", tokenizer, assets.rows[:6]), tokenizer.pad_id)
    with torch.no_grad():
        ours = loss.loss_sum(checkpoint.load_model(folder), batch, autocast=False) / len(batch.targets)
        T = batch.input_ids.shape[1]
        labels = torch.full_like(batch.input_ids, -100).flatten()
        labels[batch.loss_pos + 1] = batch.targets  # HF shifts the labels itself
        lengths = [len(ex.ids) for ex in examples_of("q2ra", tokenizer, assets.rows[:6])]
        attention_mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
        hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        theirs = hf(input_ids=batch.input_ids, attention_mask=attention_mask, labels=labels.view(-1, T)).loss
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chat_format", ["llama3", "chatml"])  # a tied output head, and its own
@pytest.mark.parametrize("loss_chunk", [loss.LOSS_CHUNK, 7])
def test_gradient_checkpointing_gives_the_same_gradients(assets, monkeypatch, loss_chunk, chat_format):
    """Blocks recomputed in the backward pass; with a small LOSS_CHUNK the output head's loss and
    gradients formed a chunk of positions at a time (ChunkedHeadLoss: sums in another order,
    equal to float rounding)."""
    monkeypatch.setattr(loss, "LOSS_CHUNK", loss_chunk)
    model = checkpoint.load_model(assets.model[chat_format]).train()
    tokenizer = Tokenizer(assets.model[chat_format])
    micro = [data.collate(examples_of("q2ra", tokenizer, assets.rows[i:i + 3]), tokenizer.pad_id) for i in (0, 3)]
    assert min(len(b.targets) for b in micro) > 7, [len(b.targets) for b in micro]
    loss_plain, grads_plain = grads(model, micro)
    model.gradient_checkpointing = True
    loss_ckpt, grads_ckpt = grads(model, micro)
    if loss_chunk > max(len(b.targets) for b in micro):  # one chunk: the very same computation
        assert loss_ckpt == loss_plain
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6)
    for a, b in zip(grads_plain, grads_ckpt):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "bf16-pure", "lora"])
def test_chunked_head_loss_follows_autograd_in_bf16_and_under_lora(assets, monkeypatch, precision):
    """ChunkedHeadLoss against autograd through head_loss, on the same hidden states: under bf16
    autocast (fp32 weights, bf16 matmuls), with bf16 weights, and with a frozen head (LoRA,
    whose head gets no gradient): the same loss and gradients, to bf16's rounding."""
    monkeypatch.setattr(loss, "LOSS_CHUNK", 7)
    model = checkpoint.load_model(assets.model["llama3"], dtype=torch.bfloat16 if precision == "bf16-pure"
                                  else torch.float32)
    head = model.lm_head.requires_grad_(precision != "lora")
    h = torch.randn(30, model.config.hidden_size, dtype=head.weight.dtype, requires_grad=True)
    targets = torch.randint(0, model.config.vocab_size, (30,))
    autocast = precision == "bf16"
    results = []
    for loss_fn in (lambda: loss.head_loss(head, h, targets, autocast),
                    lambda: loss.ChunkedHeadLoss.apply(h, head.weight, targets, autocast)):
        h.grad = head.weight.grad = None
        value = loss_fn()
        (value / 30).backward()
        results.append((value, h.grad, head.weight.grad))
    (loss_a, h_a, w_a), (loss_b, h_b, w_b) = results

    def relative_error(ours, reference):  # bf16 rounds each element: compare whole tensors
        return float((ours.float() - reference.float()).norm() / reference.float().norm())
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=0)
    assert h_b.dtype == h.dtype and relative_error(h_b, h_a) < 1e-2
    if precision == "lora":
        assert w_a is None and w_b is None
    else:
        assert w_b.dtype == head.weight.dtype and relative_error(w_b, w_a) < 1e-2


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_tiny_model_overfits_tiny_dataset(assets, tmp_path, grad_checkpointing):
    cfg = run_config(assets, tmp_path / "run", epochs=8, lr=1e-2, grad_checkpointing=grad_checkpointing)
    best = train.train(cfg)
    rows = metrics(tmp_path / "run")
    assert len(rows) == 48 and rows[-1]["loss"] < 0.2 * rows[0]["loss"]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert min(val) < 0.5 * val[0]
    # best/ holds the model with the lowest validation loss
    tokenizer = Tokenizer(best)
    val_set = examples_of("q2a", tokenizer, assets.rows[48:60])
    batches = [data.collate(val_set[i:i + 4], tokenizer.pad_id) for i in range(0, len(val_set), 4)]
    assert loss.validation_loss(checkpoint.load_model(best), batches, autocast=False) == pytest.approx(min(val), rel=1e-5)


def test_compiled_blocks_train_like_eager_ones(assets, tmp_path, uninterrupted, fresh_dynamo):
    """--compile sends each block through inductor (on CPU: generated C++), with sequence lengths
    that change from batch to batch: the run follows the eager one to float rounding, and its
    checkpoints keep their parameter names."""
    train.train(run_config(assets, tmp_path, compile=True, max_steps=6))
    got, ref = trajectory(tmp_path), trajectory(uninterrupted)[:6]
    assert [row[:2] for row in got] == [row[:2] for row in ref]
    for ours, eager in zip(got, ref):
        assert ours[2:5] == pytest.approx(eager[2:5], rel=1e-4)  # loss, lr, gradient norm
    assert checkpoint.load_model(tmp_path / "last").state_dict().keys() == \
        checkpoint.load_model(Path(uninterrupted) / "last").state_dict().keys()


# ----------------------------------------------------------------------------- resume

@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    """The reference: 30 optimizer steps over 5 epochs in one go."""
    out = tmp_path_factory.mktemp("uninterrupted")
    train.train(run_config(assets, out))
    return out


def assert_same_run(out, reference, extra_eval_at=None):
    """Same losses, lr, gradient norms and validation losses, and the same best/ and last/ weights.
    A run stopped by --max-steps also evaluates where it stops: that one extra val_loss is left out."""
    ours = [row[:-1] + (None,) if row[0] == extra_eval_at else row for row in trajectory(out)]
    assert ours == trajectory(reference)
    for name in ("last", "best"):
        a = checkpoint.load_model(Path(out) / name).state_dict()
        b = checkpoint.load_model(Path(reference) / name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), name


@pytest.mark.parametrize("stop_at", [6, 14])  # at an epoch's end, and inside an epoch
def test_resume_continues_exactly(assets, tmp_path, uninterrupted, stop_at):
    assert len(trajectory(uninterrupted)) == 30
    cfg = run_config(assets, tmp_path)
    train.train(replace(cfg, max_steps=stop_at))
    assert len(metrics(tmp_path)) == stop_at
    train.train(replace(cfg, resume=True))
    assert_same_run(tmp_path, uninterrupted, extra_eval_at=stop_at)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_the_run_records_its_memory_estimate_and_peak(assets, tmp_path, grad_accum):
    """train_config.json holds the estimate of the run's largest micro-batch (memory.plan; with
    gradient accumulation the gradients live through the later micro-batches' forward passes, so
    the estimate differs), and every metrics row the peak measured since setup began."""
    cfg = run_config(assets, tmp_path, max_steps=2, grad_accum=grad_accum, batch_size=8)
    train.train(cfg)
    recorded = json.loads((tmp_path / "train_config.json").read_text())["memory_estimate"]
    config = checkpoint.config_from_json(assets.model["llama3"] / "config.json")
    shape = {k: recorded[k] for k in ("batch", "seq", "targets")}
    assert shape["batch"] == 8
    estimate = {accumulating: memory.estimate(config, **shape, dtype="fp32", accumulating=accumulating, device="cpu")
                for accumulating in (False, True)}
    assert recorded["bytes"] == estimate[grad_accum > 1] != estimate[grad_accum == 1]
    assert recorded["accumulating"] == (grad_accum > 1)
    peaks = [row["peak_memory_bytes"] for row in metrics(cfg.out)]
    assert len(peaks) == 2 and all(isinstance(p, int) and p >= 0 for p in peaks)


@pytest.mark.parametrize("memory_saving", [dict(dtype="bf16-pure"),
                                           dict(dtype="bf16-pure", optimizer_in_backward=True, grad_accum=1,
                                                grad_clip=0.0)])
def test_bf16_pure_trains_and_resumes_exactly(assets, tmp_path, memory_saving):
    """bf16 weights and AdamW state (stochastic rounding draws from the saved RNG), with or without
    the optimizer in the backward pass: the loss falls, checkpoints are bf16, and a run stopped
    and resumed is the uninterrupted one bit for bit."""
    cfg = run_config(assets, tmp_path / "whole", lr=1e-2, epochs=3, **memory_saving)
    train.train(cfg)
    losses = [row["loss"] for row in metrics(cfg.out)]
    assert losses[-1] < 0.5 * losses[0]
    saved = load_file(tmp_path / "whole" / "last" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    split = replace(cfg, out=str(tmp_path / "split"))
    train.train(replace(split, max_steps=7))
    train.train(replace(split, resume=True))
    assert_same_run(split.out, cfg.out, extra_eval_at=7)


@pytest.mark.parametrize("dtype", ["fp32", "bf16-pure"])
def test_lora_trains_saves_merged_checkpoints_and_resumes_exactly(assets, tmp_path, dtype):
    """Only the adapters train (the base stays as it was), with gradient checkpointing; best/ and
    last/ are plain checkpoints with the adapters merged, *-adapter/ the adapter alone, and a run
    stopped and resumed (from the base and train_state.pt's adapters) is the uninterrupted one."""
    cfg = run_config(assets, tmp_path / "whole", lr=3e-2, epochs=3, lora_rank=4, lora_alpha=8.0,
                     lora_targets="q_proj,v_proj,up_proj", grad_checkpointing=True, dtype=dtype)
    train.train(cfg)
    losses = [row["loss"] for row in metrics(cfg.out)]
    assert losses[-1] < 0.93 * losses[0]  # a frozen tiny random head caps the logits: it falls from ~ln(vocab)
    base = checkpoint.load_model(assets.model["llama3"]).state_dict()
    last = checkpoint.load_model(tmp_path / "whole" / "last").state_dict()
    changed = {name for name in base if not torch.equal(base[name].to(torch.bfloat16), last[name].to(torch.bfloat16))}
    assert changed == {f"layers.{i}.{part}.weight" for i in range(2)
                       for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")}
    adapter = load_file(tmp_path / "whole" / "best-adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 6 and all(t.dtype == torch.float32 for t in adapter.values())
    split = replace(cfg, out=str(tmp_path / "split"))
    train.train(replace(split, max_steps=7))
    train.train(replace(split, resume=True))
    assert_same_run(split.out, cfg.out, extra_eval_at=7)


def test_resume_refuses_a_different_run(assets, tmp_path, uninterrupted):
    cfg = run_config(assets, tmp_path)
    train.train(replace(cfg, max_steps=2))
    with pytest.raises(FileExistsError, match="--resume"):
        train.train(cfg)
    with pytest.raises(ValueError, match="lr=0.003.*lr=0.1"):
        train.train(replace(cfg, lr=0.1, resume=True))
    with pytest.raises(FileNotFoundError, match="train_state.pt"):
        train.train(replace(cfg, out=str(tmp_path / "nothing"), resume=True))


def test_resume_after_a_crash_between_the_renames_of_a_save(assets, tmp_path, uninterrupted, capsys):
    """checkpoint.replace_dir swaps OUT/last out to OUT/.last.old-PID, then renames the new checkpoint
    in: a crash between the two leaves no OUT/last. --resume puts the old one back, says so, and
    continues from it exactly; a torn .last.old-* (no train_state.pt) is never taken."""
    cfg = run_config(assets, tmp_path)
    train.train(replace(cfg, max_steps=6))
    (tmp_path / "last").rename(tmp_path / ".last.old-12345")  # what the crash leaves
    (tmp_path / ".last.old-99999").mkdir()                      # torn: not a checkpoint
    capsys.readouterr()
    train.train(replace(cfg, resume=True))
    err = capsys.readouterr().err
    assert "restored it from .last.old-12345" in err and "resumed at step 6" in err
    assert not (tmp_path / ".last.old-12345").exists()
    assert_same_run(tmp_path, uninterrupted, extra_eval_at=6)


def test_metrics_after_the_restart_point_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    runs.truncate_metrics(path, 3)
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3]
    runs.truncate_metrics(path, 0)  # a fresh run
    assert path.read_text() == ""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_resume_after_a_real_interruption(assets, tmp_path, uninterrupted, sig):
    """A real process: Ctrl-C saves OUT/last at the end of the current step and exits 130;
    SIGKILL loses the steps since the last save (their metrics lines are dropped on resume).
    Either way the resumed run equals the uninterrupted one."""
    cfg = run_config(assets, tmp_path)
    proc = start_script("train.py", *cli_args(cfg))
    if sig == signal.SIGINT:
        wait_for(lambda: (tmp_path / "metrics.jsonl").is_file() and len(metrics(tmp_path)) >= 2, proc)
    else:  # after the first save (step 5) and a little more
        wait_for(lambda: (tmp_path / "last" / "train_state.pt").is_file() and len(metrics(tmp_path)) >= 7, proc)
    proc.send_signal(sig)
    output = proc.communicate(timeout=60)[0]
    if sig == signal.SIGINT:
        assert proc.returncode == 130, output
        assert "continue with --resume" in output
        state = torch.load(tmp_path / "last" / "train_state.pt", weights_only=True)
        assert state["step"] == len(metrics(tmp_path)) < 30
    else:
        assert proc.returncode == -signal.SIGKILL
    train.train(replace(cfg, resume=True))
    assert_same_run(tmp_path, uninterrupted)


# ----------------------------------------------------------------------------- the CLI

def test_cli_end_to_end(assets, tmp_path):
    """bf16 autocast (on CPU), checkpoints that transformers loads, and every output file."""
    out = tmp_path / "run"
    proc = start_script("train.py", "--task", "q2a", "--model", assets.model["llama3"], "--data", assets.emotion,
                        "--out", out, "--max-steps", 3, "--eval-every", 2, "--batch-size", 8, "--grad-accum", 1,
                        "--device", "cpu")
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    config = json.loads((out / "train_config.json").read_text())
    assert config["config"]["dtype"] == "bf16" and config["config"]["max_seq_len"] == 512
    assert config["train_examples"] == 48 and config["val_examples"] == 12
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and "val_loss" in rows[1] and "val_loss" in rows[2]
    assert all(r["tokens_per_s"] > r["target_tokens_per_s"] > 0 for r in rows)
    try:
        import matplotlib  # noqa: F401
        assert (out / "loss.png").stat().st_size > 0
    except ImportError:
        assert "no loss.png" in output

    from transformers import LlamaForCausalLM
    ids = torch.tensor([examples_of("q2a", Tokenizer(out / "last"), assets.rows[:1])[0].ids.tolist()])
    for name in ("best", "last"):
        hf = LlamaForCausalLM.from_pretrained(out / name, dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, checkpoint.load_model(out / name)(ids), atol=1e-5, rtol=1e-4)
    assert torch.load(out / "last" / "train_state.pt", weights_only=True)["step"] == 3


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit:
        train.parse_args(["--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in vars(TrainConfig(task="q2a", data="", out="")):
        assert "--" + name.replace("_", "-") in text
    assert "(default: 1e-05)" in text and "{bf16,bf16-pure,fp32}" in text


def test_cli_flags_round_trip():
    cfg = TrainConfig(task="rgen", data="d", out="o", lr=2e-5, epochs=1.5, grad_checkpointing=True, max_steps=7)
    assert train.parse_args(cli_args(cfg)) == cfg


# ----------------------------------------------------------------------------- a fair comparison (issue 11)

def test_q2a_and_q2ra_train_on_the_same_rows(assets, tmp_path):
    """--max-examples takes the N lowest ids, not the first N lines: stage 2 writes its rows as
    they finish (shortest texts first), so the first lines of its file are another set."""
    tokenizer = Tokenizer(assets.model["llama3"])
    completion_order = sorted(assets.rows[:48], key=lambda r: (len(r["text"]), -r["id"]))
    augmented = write_jsonl(tmp_path / "train.jsonl", completion_order, ("id", "text", "label", "reasoning"))
    prompts = {}
    for task, source in (("q2a", assets.emotion), ("q2ra", augmented)):
        cfg = TrainConfig(task=task, data=str(source), out="", val_examples=0, max_examples=10)
        train_set = load_examples(cfg, tokenizer)[0]
        prompts[task] = sorted(tuple(ex.ids[~ex.is_target].tolist()) for ex in train_set)  # the user turns
    first_ids = sorted(tuple(ex.ids[~ex.is_target].tolist()) for ex in examples_of("q2a", tokenizer, assets.rows[:10]))
    assert prompts["q2a"] == prompts["q2ra"] == first_ids


def test_the_longest_q2ra_target_parses_within_the_default_budget(assets, tmp_path):
    """A reasoning as long as stage 2's cap, then the answer line: the checkpoint's default
    reply budget (what eval.py uses) holds every training reply whole, end-of-turn included."""
    import eval as evaluation
    from metrics import parse_label
    tokenizer = Tokenizer(assets.model["llama3"])
    cap = data.DEFAULT_REASONING_TOKENS
    long_text = " ".join(f"The word {w} suggests {label}." for label, words in EMOTION_WORDS.items() for w in words.split())
    rows = [dict(row) for row in assets.rows[:8]]
    rows[3]["reasoning"] = tokenizer.decode(tokenizer.encode(long_text * 4)[:cap])  # as stage 2 writes a capped one
    augmented = write_jsonl(tmp_path / "train.jsonl", rows, ("id", "text", "label", "reasoning"))
    write_json(readers.settings_path(augmented), {"task": "rgen", "max_new_tokens": cap,  # as stage 2 records them
                                                  "label_set": labelset.EMOTION.settings()})
    out = tmp_path / "run"
    train.train(run_config(assets, out, task="q2ra", data=str(augmented), val_examples=0, max_steps=1,
                           batch_size=8, grad_accum=1))
    recorded = json.loads((out / "train_config.json").read_text())
    budget, source = evaluation.reply_budget(Tokenizer(out / "best"), "q2ra")
    assert source == str(out / "best" / "generation_config.json") and budget == recorded["max_new_tokens"] > cap
    assert recorded["reasoning_tokens"] == cap
    replies = [[i for i, m in zip(*tokenizer.render(data.example_messages("q2ra", row))) if m] for row in rows]
    assert max(len(reply) for reply in replies) > cap  # the capped reasoning's target is longer than the cap
    for row, reply in zip(rows, replies):
        assert len(reply) <= budget  # every token, the end-of-turn one included: never cut off
        assert parse_label("q2ra", tokenizer.decode(reply[:budget])) == row["label"]


def test_a_checkpoint_serves_the_prompt_it_was_trained_on(assets, tmp_path, meta_tokenizer_dir):
    """Meta's Llama 3.2 tokenizer (base model: no chat template, eos <|end_of_text|>), a tiny
    random Llama with its vocabulary, llama3 rope scaling and tied embeddings, one step of
    train.py: the saved folder's chat template gives transformers exactly our prompt."""
    transformers = pytest.importorskip("transformers")
    tokenizer = Tokenizer(meta_tokenizer_dir)
    model = tiny_llama(128256, tokenizer=tokenizer, hidden_size=32, intermediate_size=64, head_dim=8,
                       rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
                       rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192})
    base = checkpoint.save_model(model, tmp_path / "base", tokenizer.serving_files())
    out = tmp_path / "run"
    proc = start_script("train.py", "--task", "q2a", "--model", base, "--data", assets.emotion, "--out", out,
                        "--max-steps", 1, "--batch-size", 2, "--grad-accum", 1, "--val-examples", 2,
                        "--dtype", "fp32", "--device", "cpu")
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output

    saved = out / "best"
    ours = Tokenizer(saved)
    assert ours.stop_ids >= {128001, 128008, 128009} and ours.bos_id == 128000
    assert "Cutting Knowledge" not in json.loads((saved / "tokenizer_config.json").read_text())["chat_template"]
    hf = transformers.AutoTokenizer.from_pretrained(str(saved))
    row = assets.rows[0]
    for messages, prompt in ((data.prompt_messages("q2a", row), True), (data.example_messages("q2a", row), False),
                             ([{"role": "system", "content": "Be brief."}] + data.example_messages("q2ra", row), False)):
        ids = ours.render(messages, add_generation_prompt=prompt)[0]
        out_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
        assert list(out_ids["input_ids"] if hasattr(out_ids, "keys") else out_ids) == ids
        assert ids.count(128000) == 1 and ids[0] == 128000
    generation = transformers.GenerationConfig.from_pretrained(str(saved))
    assert set(generation.eos_token_id) >= {128001, 128008, 128009}
    model = transformers.LlamaForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    ids = torch.tensor([ours.render(data.prompt_messages("q2a", row), add_generation_prompt=True)[0]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, checkpoint.load_model(saved)(ids), atol=1e-5, rtol=1e-4)


def test_rgen_columns_flag_names_the_columns(assets, tmp_path):
    tokenizer = Tokenizer(assets.model["llama3"])
    rows = [{"q": r["question"], "a": r["answer"], "why": r["reasoning"]} for r in assets.rgen_rows]
    source = write_jsonl(tmp_path / "train.jsonl", rows, ("q", "a", "why"))
    cfg = TrainConfig(task="rgen", data=str(source), out="", val_examples=0)
    with pytest.raises(ValueError, match="--rgen-columns question=COL,answer=COL,reasoning=COL"):
        load_examples(cfg, tokenizer)
    cli = train.parse_args(["--task", "rgen", "--data", str(source), "--out", "x",
                            "--rgen-columns", "question=q,answer=a,reasoning=why"])
    train_set = load_examples(replace(cli, val_examples=0), tokenizer)[0]
    assert [ex.ids.tolist() for ex in train_set] == [ex.ids.tolist() for ex in examples_of("rgen", tokenizer, assets.rgen_rows)]
