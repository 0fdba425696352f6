"""Every CUDA path on a tiny model: run `python -m pytest -m gpu` first on a new GPU machine (a few
minutes). Skipped without CUDA; the CPU versions of these checks run in the rest of the suite.

fused AdamW and bf16 autocast, bf16-pure, the optimizer in the backward pass, LoRA, the compiled
decode step replayed without recompiling, the peak-memory report and the traced peak against
what the GPU allocates, a 20-step q2a run with resume, and the benchmark on the GPU.
"""
import json
import sys
from dataclasses import replace

import pytest
import torch

import generate
import lora
import loss
import memory
import optim
import train
from generate import SamplingConfig, generate_ids
from helpers import ROOT, metrics, run_config, trajectory
from model import LlamaConfig
from tiny import CONFIG_JSON, batches, prompts_of, tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def close_runs(out, reference, rel=1e-3):
    """The same steps and learning rates; losses equal to what GPU kernels' summation order allows."""
    ours, ref = trajectory(out), trajectory(reference)
    assert [row[:2] + (row[3],) for row in ours] == [row[:2] + (row[3],) for row in ref]
    assert [row[2] for row in ours] == pytest.approx([row[2] for row in ref], rel=rel)


def test_fused_adamw_with_bf16_autocast_trains(assets, tmp_path):
    assert optim.build_optimizer(tiny_llama(64).to(CUDA), 1e-3, 0.0, False, CUDA).defaults["fused"]
    cfg = run_config(assets, tmp_path, device="cuda", dtype="bf16", lr=1e-2, epochs=4)
    train.train(cfg)
    losses = [row["loss"] for row in metrics(cfg.out)]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("settings", [
    dict(dtype="bf16-pure"),
    dict(dtype="bf16-pure", optimizer_in_backward=True, grad_accum=1, grad_clip=0.0),
    dict(dtype="bf16", lora_rank=4, lora_alpha=8.0, grad_checkpointing=True, lr=3e-2),
])
def test_each_memory_saving_trains_and_resumes_for_20_steps(assets, tmp_path, settings):
    """The q2a run of 20 steps (the last one stopped at step 10 and resumed) follows the one in one go."""
    cfg = run_config(assets, tmp_path / "whole", device="cuda", max_steps=20, **{"lr": 1e-2, **settings})
    train.train(cfg)
    losses = [row["loss"] for row in metrics(cfg.out)]
    assert losses[-1] < losses[0]
    split = replace(cfg, out=str(tmp_path / "split"))
    train.train(replace(split, max_steps=10))
    train.train(replace(split, resume=True))
    close_runs(split.out, cfg.out, rel=2e-2)


def test_optimizer_in_backward_equals_the_ordinary_step_on_cuda():
    def run(in_backward):
        model = tiny_llama(50, seed=1).to(CUDA)
        optimizer = optim.build_optimizer(model, 1e-3, 0.1, in_backward, CUDA)
        losses = []
        for batch in batches(4):
            losses.append(loss.forward_backward(model, [batch.to(CUDA)], autocast=False))
            optim.optimizer_step(optimizer, model.parameters(), grad_clip=0.0)
        return losses
    assert run(True) == pytest.approx(run(False), rel=1e-4)


def test_lora_merged_weights_give_the_adapted_logits_on_cuda():
    model = tiny_llama(64).to(CUDA)
    lora.add_adapters(model, 4, 8.0)
    with torch.no_grad():
        for layer in lora.adapters(model).values():
            layer.lora_B.normal_(0.0, 0.05)
    merged = tiny_llama(64).to(CUDA)
    merged.load_state_dict(lora.merged_state(model))
    ids = torch.randint(0, 64, (2, 9), device=CUDA)
    torch.testing.assert_close(merged(ids), model(ids), atol=1e-4, rtol=1e-4)


def test_compiled_decode_replays_one_graph_for_a_whole_generation(fresh_dynamo):
    """generate.compiled_decoder on CUDA (a static cache, CUDA graphs): the eager replies, and no
    recompile after the first step, through refills and idle rows."""
    model = tiny_llama(97, std=0.3).eval().to(CUDA)   # peaked logits: argmax has no near-ties
    prompts = prompts_of([3, 11, 6, 15, 1, 8, 4])
    greedy = SamplingConfig(max_new_tokens=20)
    expected = generate_ids(model, prompts, set(range(8)), greedy, batch_size=3)
    compiled = generate.compiled_decoder("cuda")
    calls = []

    def step(*args):
        calls.append(1)
        if len(calls) == 1:
            return compiled.step(*args)
        with torch.compiler.set_stance("fail_on_recompile"):
            return compiled.step(*args)

    decoder = generate.Decoder(step, static=True)
    assert generate_ids(model, prompts, set(range(8)), greedy, batch_size=3, decoder=decoder) == expected
    assert len(calls) > 10


def test_peak_memory_is_measured_beside_its_estimate(assets, tmp_path):
    cfg = run_config(assets, tmp_path, device="cuda", dtype="bf16-pure", max_steps=3)
    train.train(cfg)
    estimate = json.loads((tmp_path / "train_config.json").read_text())["memory_estimate"]
    assert estimate["bytes"]["total"] > 0 and estimate["batch"] == cfg.batch_size
    peaks = [row["peak_memory_bytes"] for row in metrics(cfg.out)]
    assert 0 < peaks[0] <= peaks[-1]


@pytest.mark.parametrize("settings, accumulate", [
    (dict(dtype="bf16-pure", optimizer_in_backward=True, grad_checkpointing=True), 1),
    (dict(dtype="bf16", grad_checkpointing=True), 2),
    (dict(dtype="bf16", lora_rank=16), 1),
], ids=["bf16-pure-in-backward", "autocast-accumulating", "lora"])
def test_the_cuda_peak_is_the_traced_one(settings, accumulate):
    """What a training step allocates on the GPU at most (two 1B-wide blocks: bf16-pure with the
    optimizer in the backward pass; autocast over fp32 masters summing two micro-batches; LoRA) is
    its trace on fake tensors (bench/memory_trace.py) give or take the kernels' workspaces, and the
    estimate covers it: the README's memory table checked on a real GPU."""
    sys.path.insert(0, str(ROOT / "bench"))
    import memory_trace
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
    traced = memory_trace.traced_peak(config, 4, 512, accumulate=accumulate, **settings)
    measured = memory_trace.measured_peak(config, 4, 512, CUDA, accumulate=accumulate, **settings)
    estimate = memory.estimate(config, 4, 512, 4 * 256, loss_chunk=loss.LOSS_CHUNK, accumulating=accumulate > 1,
                               **settings)["total"]
    assert 0.95 * traced <= measured <= 1.05 * traced + 64e6  # cuBLAS's workspace: tens of MB
    assert measured <= 1.05 * estimate + 64e6


def test_the_benchmark_runs_on_the_gpu(tmp_path, fresh_dynamo):
    sys.path.insert(0, str(ROOT / "bench"))
    import bench
    (tmp_path / "config.json").write_text(json.dumps(CONFIG_JSON))
    bench.main(["--config", str(tmp_path / "config.json"), "--device", "cuda", "--reps", "1", "--warmup", "1",
                "--train-reps", "1", "--train-warmup", "1", "--batch", "2", "--seq", "16", "--prompt-len", "8",
                "--new-tokens", "3", "--stage2-rows", "3", "--stage2-batch", "2", "--stage2-new-tokens", "3",
                "--grid-seqs", "16", "--grid-batches", "2", "--out", str(tmp_path / "bench.json")])
    figures = json.loads((tmp_path / "bench.json").read_text())["figures"]
    assert figures and all(f["ours"] > 0 and f["transformers"] > 0 for f in figures)
