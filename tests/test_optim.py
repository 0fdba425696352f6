"""optim.py: stochastic rounding, AdamW on bf16 weights, the step inside the backward pass, the
weight-decay groups and the schedule, on tiny random models on CPU."""
import math

import pytest
import torch

import loss
import optim
import train
from tiny import batches, tiny_llama

VOCAB = 50


def test_stochastic_rounding_keeps_the_mean():
    """1 + 2^-9 lies a quarter of the way from 1 to the next bf16 value (1 + 2^-7: 7 mantissa bits):
    it rounds up a quarter of the time, and the mean stays 1 + 2^-9; round-to-nearest gives 1."""
    torch.manual_seed(0)
    x = torch.full((200_000,), 1 + 2 ** -9)
    rounded = optim.round_stochastic(x)
    assert rounded.dtype == torch.bfloat16
    assert set(rounded.float().unique().tolist()) == {1.0, 1 + 2 ** -7}
    assert rounded.float().mean().item() == pytest.approx(1 + 2 ** -9, abs=3e-5)
    assert x.to(torch.bfloat16).float().mean().item() == 1.0
    exact = torch.tensor([-3.5, 0.0, 1.0, -2 ** -20], dtype=torch.bfloat16).float()
    assert torch.equal(optim.round_stochastic(exact).float(), exact)  # bf16 values stay as they are
    negative = optim.round_stochastic(-x).float()
    assert negative.mean().item() == pytest.approx(-(1 + 2 ** -9), abs=3e-5)


def test_bf16_adamw_follows_torch_adamw():
    """Three steps on bf16 weights land within bf16 rounding of torch's AdamW on fp32 copies."""
    torch.manual_seed(0)
    w32 = torch.randn(64, 32, requires_grad=True)
    w16 = w32.detach().to(torch.bfloat16).requires_grad_()
    reference = torch.optim.AdamW([w32], lr=1e-2, weight_decay=0.1)
    ours = optim.BF16AdamW([w16], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(64, 32)
        w32.grad, w16.grad = g.clone(), g.to(torch.bfloat16)
        reference.step()
        ours.step()
    assert ours.state[w16]["exp_avg"].dtype == torch.bfloat16
    assert torch.allclose(w16.float(), w32.detach(), atol=2e-2, rtol=1e-2)
    assert (w16.float() - w32.detach()).abs().mean() < 3e-3


def test_small_updates_survive_only_with_stochastic_rounding():
    """At lr 1e-5 an update is far below bf16's resolution next to a weight near 1: stochastic
    rounding moves the weights by the right amount on average; round-to-nearest not at all."""
    torch.manual_seed(0)
    w = torch.ones(100_000, dtype=torch.bfloat16, requires_grad=True)
    opt = optim.BF16AdamW([w], lr=1e-5)
    for _ in range(20):
        w.grad = torch.ones_like(w)  # Adam's step is then lr per step
        opt.step()
    assert w.float().mean().item() == pytest.approx(1 - 20 * 1e-5, abs=2e-5)
    assert (w.detach().float() - 1).abs().max() > 0
    assert torch.equal((torch.ones(4) - 1e-5).to(torch.bfloat16), torch.ones(4, dtype=torch.bfloat16))


@pytest.mark.parametrize("bf16_weights", [False, True])
def test_optimizer_in_backward_equals_the_ordinary_step(bf16_weights):
    """Five steps with the update inside the backward pass give the ordinary loop's losses, gradient
    norms and weights (fp32: within float tolerance; bf16-pure: the same random rounding noise
    is drawn in another order, so within bf16 noise), and no gradient is left behind."""
    def run(in_backward):
        model = tiny_llama(VOCAB, seed=1)
        if bf16_weights:
            model = model.to(torch.bfloat16)
        optimizer = optim.build_optimizer(model, 1e-3, 0.1, in_backward, torch.device("cpu"))
        torch.manual_seed(2)
        history = []
        for batch in batches(5):
            for group in optimizer.param_groups:
                group["lr"] = 1e-3
            step_loss = loss.forward_backward(model, [batch], autocast=False)
            history.append((step_loss, optim.optimizer_step(optimizer, model.parameters(), grad_clip=0.0)))
        assert all(p.grad is None for p in model.parameters())
        return history, model

    (ordinary, a), (in_backward, b) = run(False), run(True)
    tolerance = dict(rel=2e-2) if bf16_weights else dict(rel=1e-5)
    assert [loss for loss, _ in in_backward] == pytest.approx([loss for loss, _ in ordinary], **tolerance)
    assert [norm for _, norm in in_backward] == pytest.approx([norm for _, norm in ordinary], **tolerance)
    start = tiny_llama(VOCAB, seed=1)
    for p, q, p0 in zip(a.parameters(), b.parameters(), start.parameters()):
        if not bf16_weights:
            assert torch.allclose(p, q, atol=1e-6)
        elif p.dim() == 2:  # the two runs differ by rounding noise, far less than the training moved them
            # (not the norm gains: next to 1, bf16's step 2^-7 exceeds five updates of lr 1e-3)
            assert (p.float() - q.float()).abs().mean() < 0.2 * (p.float() - p0).abs().mean()


def test_optimizer_in_backward_state_round_trips():
    model = tiny_llama(VOCAB)
    optimizer = optim.build_optimizer(model, 1e-3, 0.0, True, torch.device("cpu"))
    loss.forward_backward(model, batches(1), autocast=False)
    restored = optim.build_optimizer(tiny_llama(VOCAB), 1e-3, 0.0, True, torch.device("cpu"))
    restored.load_state_dict(optimizer.state_dict())
    first = next(iter(optimizer.optimizers.values())).state_dict()["state"][0]["exp_avg"]
    assert torch.equal(next(iter(restored.optimizers.values())).state_dict()["state"][0]["exp_avg"], first)
    assert first.abs().sum() > 0


@pytest.mark.parametrize("change, message", [
    (dict(grad_accum=2, grad_clip=0.0), "--grad-accum 1"),
    (dict(grad_accum=1), "--grad-clip 0"),
])
def test_optimizer_in_backward_refuses_what_it_cannot_do(change, message):
    with pytest.raises(ValueError, match=message):
        train.TrainConfig(task="q2a", data="d", out="o", optimizer_in_backward=True, **change)


@pytest.mark.parametrize("bf16_weights", [False, True])
def test_weight_decay_only_on_matrices(bf16_weights):
    model = tiny_llama(VOCAB, tie_word_embeddings=True).to(torch.bfloat16 if bf16_weights else torch.float32)
    optimizer = optim.build_optimizer(model, 1e-3, 0.1, False, torch.device("cpu"))
    assert isinstance(optimizer, optim.BF16AdamW if bf16_weights else torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if "norm" in n}
    assert all(p.dim() == 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied: once


def test_lr_schedule_warmup_then_cosine():
    lr = [optim.lr_at(step, 101, 1e-3, warmup_ratio=0.1, min_lr_ratio=0.1) for step in range(101)]
    assert lr[0] == pytest.approx(1e-4) and lr[4] == pytest.approx(5e-4) and lr[9] == pytest.approx(1e-3)
    assert lr[10] == pytest.approx(1e-3)                       # cosine starts at the peak,
    assert lr[55] == pytest.approx(0.55e-3)                    # is halfway down halfway,
    assert lr[100] == pytest.approx(1e-4)                      # and ends at lr * min_lr_ratio
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert optim.lr_at(0, 101, 1e-3, warmup_ratio=0.0, min_lr_ratio=0.1) == pytest.approx(1e-3)
    assert math.isclose(optim.lr_at(100, 101, 1e-3, 0.0, 0.0), 0.0, abs_tol=1e-12)
