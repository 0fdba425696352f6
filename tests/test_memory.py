"""memory.py: the estimate's arithmetic on the shapes of real Llama models (no model is built but
tiny ones), the targets the README's table promises, and the probe that measures the peak."""
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import data
import lora
import loss
import memory
import optim
from model import LlamaConfig
from helpers import ONE_THREAD, ROOT
from tiny import tiny_llama

sys.path.insert(0, str(ROOT / "bench"))
import memory_table  # noqa: E402
from memory_table import MODELS, MODES, SMALL  # noqa: E402

LLAMA_1B = MODELS["Llama-3.2-1B"]
P_1B = 1_235_814_400  # Llama-3.2-1B's parameters, tied embedding counted once


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_is_the_models(tied):
    model = tiny_llama(50, tie_word_embeddings=tied)
    assert memory.parameter_count(model.config) == model.num_params()


def test_parameter_count_of_llama_3_2_1b():
    assert memory.parameter_count(LLAMA_1B) == P_1B


@pytest.mark.parametrize("settings, bytes_per_parameter", [
    (dict(dtype="fp32"), 16), (dict(dtype="bf16"), 16),   # fp32 weights, gradients and two moments
    (dict(dtype="bf16-pure"), 8),                          # all four in bf16
])
def test_weights_gradients_and_adamw_state_per_parameter(settings, bytes_per_parameter):
    parts = memory.estimate(LLAMA_1B, 1, 1, 1, **settings)
    assert parts["weights"] + parts["gradients"] + parts["optimizer"] == bytes_per_parameter * P_1B
    # A one-token micro-batch peaks after the backward pass: every gradient, and the embedding's as it
    # forms (or bf16-pure's optimizer temporaries, if larger)
    held = parts["weights"] + parts["gradients"] + parts["optimizer"]
    assert parts["total"] == held + max(parts["embedding_gradient"], parts["optimizer_temporaries"])
    assert (parts["weight_copies"] > 0) == (settings["dtype"] == "bf16")  # autocast's bf16 copies
    # bf16-pure's AdamW updates one slice of optim.CHUNK elements at a time, 28 bytes of fp32 temporaries each
    assert parts["optimizer_temporaries"] == (28 * optim.CHUNK if settings["dtype"] == "bf16-pure" else 0)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "bf16-pure"])
def test_gradients_live_through_the_forward_pass_only_when_they_accumulate(dtype):
    """Without checkpointing a long micro-batch peaks as its backward pass begins (every block's
    activations, the logits and their gradient): no gradient exists yet, as the last step freed
    them, unless the step accumulates them over micro-batches."""
    one = memory.estimate(LLAMA_1B, 8, 512, 2048, dtype)
    accumulating = memory.estimate(LLAMA_1B, 8, 512, 2048, dtype, accumulating=True)
    saved = one["activations"] + one["logits"] + one["weight_copies"]
    assert one["total"] <= one["weights"] + one["optimizer"] + saved  # no gradient at the peak
    assert accumulating["total"] - one["total"] == one["gradients"]


def test_the_optimizer_in_backward_keeps_only_the_largest_gradient():
    parts = memory.estimate(LLAMA_1B, 1, 1, 1, "bf16-pure", optimizer_in_backward=True)
    assert parts["gradients"] == 2 * 128256 * 2048  # the tied embedding's, alive for the whole backward pass


def test_lora_trains_only_the_adapters():
    parts = memory.estimate(LLAMA_1B, 1, 1, 1, "bf16", lora_rank=16)
    d, f, q, kv = 2048, 8192, 2048, 512
    adapters = 16 * 16 * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d))
    assert parts["weights"] == 2 * P_1B + 4 * adapters                 # frozen bf16 base, fp32 adapters
    assert (parts["gradients"], parts["optimizer"]) == (4 * adapters, 8 * adapters)


def test_checkpointing_keeps_block_inputs_and_chunks_the_logits():
    plain = memory.estimate(LLAMA_1B, 8, 512, 2048, "bf16-pure")
    ckpt = memory.estimate(LLAMA_1B, 8, 512, 2048, "bf16-pure", grad_checkpointing=True, loss_chunk=256)
    # the saved log-softmax, the gradient it gets and the one it passes on, in fp32; a chunk's bf16
    # logits and the fp32 copy that becomes their gradient in place (loss.ChunkedHeadLoss)
    assert (plain["logits"], ckpt["logits"]) == (2048 * 128256 * 12, 256 * 128256 * (2 + 4))
    assert ckpt["activations"] < plain["activations"] / 5


def saved_by_one_block(config, dtype: str, lora_rank: int, lora_targets, B: int, T: int) -> tuple[int, int]:
    """What autograd saves in a forward pass through one real decoder block in the run's set-up
    (train.training_model's dtypes, loss.loss_sum's autocast), as bytes per token and bytes of
    weight-shaped tensors (autocast's weight copies); each storage counted once, parameters and
    the rotary table (shared by every block) left out."""
    model = tiny_llama(50, **config)
    if dtype == "bf16-pure" or (lora_rank and dtype == "bf16"):
        model = model.to(torch.bfloat16)
    if lora_rank:
        lora.add_adapters(model, lora_rank, 16.0, lora_targets)
    x = torch.randn(B, T, model.config.hidden_size, dtype=model.embed_tokens.weight.dtype, requires_grad=True)
    cos, sin = model.rotary(torch.arange(T).expand(B, T))
    shared = {t.untyped_storage().data_ptr() for t in (*model.parameters(), cos, sin)}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in shared:
            saved[t.untyped_storage().data_ptr()] = (t.shape[0] in (B, B * T), t.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        model.layers[0](x, cos, sin, None)
    per_token = sum(n for tokens, n in saved.values() if tokens)
    return per_token // (B * T), sum(n for tokens, n in saved.values() if not tokens)


@pytest.mark.parametrize("lora_rank, lora_targets", [(0, lora.TARGETS), (4, lora.TARGETS), (4, ("q_proj", "v_proj")),
                                                     (4, ("o_proj", "down_proj"))], ids=["full", "lora", "lora-qv", "lora-od"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "bf16-pure"])
def test_block_activations_are_what_autograd_saves(dtype, lora_rank, lora_targets):
    """The estimate's per-token activations of a block equal the bytes autograd saves in a real one,
    and the bf16 copies of fp32 matrices (autocast's; LoRA's of its adapters on a bf16 base) are 2 bytes
    per trained matrix element (sizes chosen so that no two dimensions coincide with the token count)."""
    config = dict(hidden_size=96, intermediate_size=160, num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    per_token, copies = saved_by_one_block(config, dtype, lora_rank, lora_targets, B=3, T=37)
    shape = LlamaConfig(vocab_size=50, num_hidden_layers=1, **config)
    assert per_token == memory.block_activation_bytes(shape, dtype, lora_rank, lora_targets)
    if dtype == "bf16" or (lora_rank and dtype == "bf16-pure"):  # bf16 copies of fp32 matrices
        rows = memory.linear_shapes(shape)
        trained = sum(lora_rank * (rows[t][0] + rows[t][1]) for t in lora_targets) if lora_rank else \
            sum(i * o for i, o in rows.values())
        assert copies == 2 * trained
    else:
        assert copies == 0


def test_the_plan_is_the_largest_micro_batch_s_estimate():
    """Three examples (tokens, of which targets): a batch of two pads to the longer one; the
    plan is the micro-batch whose estimate (under the run's flags) is largest, with its shape."""
    lengths, targets = [1000, 400, 3000], [100, 200, 500]
    flags = memory.MemoryFlags(dtype="bf16-pure", lora_rank=8, lora_targets="q_proj,v_proj", grad_checkpointing=True)
    options = dict(lora_rank=8, lora_targets=["q_proj", "v_proj"], grad_checkpointing=True, loss_chunk=256)
    planned = memory.plan(LLAMA_1B, lengths, targets, [[0, 1], [2]], flags, loss_chunk=256)
    assert {k: planned[k] for k in ("batch", "seq", "targets")} == {"batch": 1, "seq": 3000, "targets": 500}
    assert planned["bytes"] == memory.estimate(LLAMA_1B, 1, 3000, 500, "bf16-pure", **options)
    other = memory.plan(LLAMA_1B, lengths, targets, [[0, 1]], flags, loss_chunk=256)
    assert other["bytes"] == memory.estimate(LLAMA_1B, 2, 1000, 300, "bf16-pure", **options)
    assert other["bytes"]["total"] < planned["bytes"]["total"]


def test_the_readme_table_meets_the_targets():
    """Issue 16's targets, at batch 8 x 512 with gradient checkpointing: the 1B full fine-tune in
    bf16-pure under 12 GB, with the optimizer in the backward pass under 9 GB, the 8B with LoRA
    rank 16 under 22 GB."""
    with_checkpointing = {row: cells[1] / 1e9 for row, cells in memory_table.estimates().items()}
    assert with_checkpointing[("Llama-3.2-1B", "bf16-pure")] <= 12.0
    assert with_checkpointing[("Llama-3.2-1B", "bf16-pure + optimizer in backward")] <= 9.0
    assert with_checkpointing[("Llama-3.1-8B", "LoRA r16, bf16 base")] <= 22.0


def test_the_table_of_accumulating_steps_adds_the_gradients_where_they_can_accumulate():
    """bench/memory_table.py --grad-accum 2: the optimizer in the backward pass cannot accumulate (left
    out), and every other cell needs more than a step of one micro-batch."""
    one, two = memory_table.estimates(), memory_table.estimates(accumulate=2)
    assert set(two) == {row for row in one if row[1] != "bf16-pure + optimizer in backward"}
    assert all(a > b for row in two for a, b in zip(two[row], one[row]))


def traced_and_estimated(config, batch: int, seq: int, accumulate: int = 1, **settings) -> tuple[int, dict]:
    """A training step on batch x seq tokens, the second half of each a target, summing `accumulate`
    micro-batches: the peak traced on fake tensors (bench/memory_trace.py) and memory.estimate's parts."""
    import memory_trace
    traced = memory_trace.traced_peak(config, batch, seq, accumulate=accumulate, **settings)
    estimate = memory.estimate(config, batch, seq, batch * (seq - seq // 2), loss_chunk=loss.LOSS_CHUNK,
                               accumulating=accumulate > 1, **settings)
    return traced, estimate


@pytest.mark.parametrize("mode, checkpointing, accumulate", [
    ("bf16-pure + optimizer in backward", True, 1), ("LoRA r16, bf16 base", True, 1), ("bf16, fp32 master", False, 1),
    ("bf16-pure", True, 2), ("bf16, fp32 master", False, 2)])
def test_the_estimate_is_near_the_peak_traced_at_the_real_1b_shapes(mode, checkpointing, accumulate):
    """A training step of the real Llama-3.2-1B shapes at 8 x 512 (of one micro-batch, or summing the
    gradients of two), traced on fake tensors (seconds, no memory): the estimate lies within 2 % of
    the tensors it holds at its peak (the README states the range over its table)."""
    traced, estimate = traced_and_estimated(LLAMA_1B, 8, 512, accumulate, grad_checkpointing=checkpointing,
                                            **MODES[mode])
    assert 0.98 * traced <= estimate["total"] <= 1.02 * traced
    if mode == "bf16-pure + optimizer in backward":
        assert traced <= 9e9  # issue 16's target, met by what the step holds, not only by the estimate


@pytest.mark.parametrize("mode", ["bf16-pure", "bf16-pure + optimizer in backward"])
def test_an_untied_embedding_s_gradient_is_counted_only_once_it_exists(mode):
    """Llama-3.1-8B's untied head and embedding (four of its blocks, 8 x 512, checkpointing): the
    embedding's gradient forms after every block's backward pass, and with the optimizer in the
    backward pass the head's is freed before the first block's. Counting either too early put the
    estimate 6-7 % above the traced peak; leaving out the head's inputs (the final norm's saved
    tensors and the rows the head reads, with their gradient), 0.8 % below it."""
    config = replace(MODELS["Llama-3.1-8B"], num_hidden_layers=4)
    traced, estimate = traced_and_estimated(config, 8, 512, grad_checkpointing=True, **MODES[mode])
    assert 0.99 * traced <= estimate["total"] <= 1.01 * traced


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
@pytest.mark.parametrize("mode", MODES)
def test_a_small_model_s_step_traces_to_its_estimate(mode, checkpointing):
    """Four blocks in SmolLM2-135M's shapes at 8 x 128 (the demo's kind of model and batch), every
    mode: the estimate lies within 0.5 % of the traced peak. With the optimizer in the backward pass
    a block's backward pass updates only that block's parameters: counting the fp32 temporaries of
    an update of the embedding's size there put the estimate 9 % above the trace."""
    config = replace(SMALL, num_hidden_layers=4)
    traced, estimate = traced_and_estimated(config, 8, 128, grad_checkpointing=checkpointing, **MODES[mode])
    assert 0.995 * traced <= estimate["total"] <= 1.005 * traced


def test_under_lora_the_first_block_s_input_needs_no_gradient():
    """LoRA freezes the embedding, so the first block's input needs no gradient and the block's first
    norm saves nothing. One block whose activations dominate the step, no checkpointing: counting
    that norm's fp32 input put the estimate 4.7 % above the trace."""
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)
    traced, estimate = traced_and_estimated(config, 4, 256, dtype="bf16-pure", lora_rank=4)
    assert 0.99 * traced <= estimate["total"] <= 1.01 * traced


def test_the_tracer_counts_each_live_storage_once():
    import memory_trace
    tracker = memory_trace.LiveBytes()
    with tracker:
        a = torch.empty(1000, dtype=torch.uint8)
        view = a[10:]                                   # the same storage: not counted again
        b = torch.empty(500, dtype=torch.uint8)
        del a
        assert tracker.now == 1500                      # the view keeps a's storage alive
        del view
        c = torch.empty(2000, dtype=torch.uint8)
        assert (tracker.now, tracker.peak) == (2500, 2500)
    del b, c


@pytest.mark.parametrize("settings", [dict(dtype="bf16-pure", optimizer_in_backward=True), dict(dtype="bf16", lora_rank=4),
                                      dict(dtype="fp32")], ids=["bf16-pure-in-backward", "lora", "fp32"])
def test_fake_tensors_trace_the_peak_of_real_ones(settings):
    """The tracer's premise: fake tensors (shapes without data) go through the same operations as
    real ones, so the peak traced on them is the real step's, to within a few small tensors."""
    import memory_trace
    config = LlamaConfig(vocab_size=3000, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
    fake, real = (memory_trace.traced_peak(config, 4, 300, grad_checkpointing=True, fake=fake, **settings)
                  for fake in (True, False))
    assert abs(fake - real) <= 0.001 * real


# A model whose logits dominate a step's memory: 32,000 words, 64 wide.
WIDE_VOCABULARY = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
EACH_DTYPE = pytest.mark.parametrize("settings", [dict(dtype="fp32"), dict(dtype="bf16"), dict(dtype="bf16-pure"),
                                                  dict(dtype="bf16-pure", lora_rank=4)],
                                     ids=["fp32", "bf16", "bf16-pure", "lora"])


@EACH_DTYPE
def test_whole_logits_peak_in_the_log_softmax_s_backward_pass(settings):
    """512 positions with a loss, no checkpointing: at the logits' peak the fp32 log-softmax and two
    gradients exist, 12 bytes a logit in every dtype (the bf16 logits are gone by then; counting
    them put the estimate 14-16 % above the trace)."""
    traced, estimate = traced_and_estimated(WIDE_VOCABULARY, 4, 256, **settings)
    assert estimate["logits"] > 0.8 * traced
    assert 0.99 * traced <= estimate["total"] <= 1.01 * traced


@EACH_DTYPE
def test_chunked_logits_exist_one_chunk_at_a_time(settings):
    """2,048 positions with a loss, checkpointing: loss.ChunkedHeadLoss forms LOSS_CHUNK positions'
    logits at a time, beside the final norm's saved tensors and the head's inputs and their
    gradient, and RoPE's angles. When each chunk's gradient lived on beside the next chunk's logits,
    the trace was 16-47 % above the estimate; leaving out the head's inputs puts the estimate up to
    4.5 % below it, and leaving out RoPE's angles up to 1 %."""
    traced, estimate = traced_and_estimated(WIDE_VOCABULARY, 4, 1024, grad_checkpointing=True, **settings)
    assert estimate["logits"] > 0.45 * traced
    assert 0.995 * traced <= estimate["total"] <= 1.005 * traced


def test_a_tied_embedding_s_two_gradients_meet_in_place(monkeypatch):
    """The tracer's one correction: outside a dispatch mode, autograd adds the lookup's gradient
    into the head's (loss.ChunkedHeadLoss's) in place; no third vocabulary x d tensor forms."""
    model = tiny_llama(3000, tie_word_embeddings=True).train()
    model.gradient_checkpointing = True
    batch = data.collate([data.Example(torch.arange(600, dtype=torch.int32) % 3000, torch.arange(600) >= 300)], 0)
    head_gradient = {}
    backward = loss.ChunkedHeadLoss.backward

    def keep_pointer(ctx, grad_total):
        grads = backward(ctx, grad_total)
        head_gradient["pointer"] = grads[1].data_ptr()
        return grads
    monkeypatch.setattr(loss.ChunkedHeadLoss, "backward", staticmethod(keep_pointer))
    loss.loss_sum(model, batch, autocast=False).backward()
    assert model.embed_tokens.weight.grad.data_ptr() == head_gradient["pointer"]


def test_the_benchmark_measures_a_training_step_beside_its_estimate():
    """memory_table.measure runs memory_trace.measured_peak (the steps the GPU check compares with
    their trace) and sets the estimate of the same micro-batch beside it."""
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    result = memory_table.measure(config, "bf16-pure", batch=2, seq=16)
    assert result["measured_bytes"] >= 0 and result["seconds"] > 0
    targets = 2 * 8  # each example's second half is its reply
    assert result["estimate_bytes"] == memory.estimate(config, 2, 16, targets, "bf16-pure", device="cpu")["total"]


def test_the_small_runs_are_train_py_s_own_in_each_mode(monkeypatch):
    """bench/memory_table.py --small, on a narrower model for two steps: train.py runs in each mode
    (fp32, bf16-pure, LoRA) and reports its peak and losses."""
    monkeypatch.setattr(memory_table, "SMALL", replace(memory_table.SMALL, hidden_size=64, intermediate_size=128,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2, head_dim=16))
    results = memory_table.small_runs(steps=2)
    assert list(results) == list(memory_table.SMALL_RUNS)
    for run in results.values():
        assert run["peak_bytes"] >= 0 and run["first_loss"] > 0 and run["last_loss"] > 0


def test_the_probe_sees_a_tensor_it_did_not_hold_before():
    """In a process of its own: memory that earlier tests left behind, released while the probe
    measures, lowers the resident set by as much as the tensor adds (seen in a reverse-order run)."""
    code = ("import torch, memory\n"
            "peak = memory.memory_probe(torch.device('cpu'))\n"
            "held = torch.ones(64 * 2 ** 20, dtype=torch.uint8)  # 64 MiB, touched\n"
            "print(peak())\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert 60 * 2 ** 20 < int(run.stdout) < 200 * 2 ** 20
