"""Does bf16-pure train as well as fp32 master weights? A small CPU experiment at lr 1e-5.

    python bench/precision.py                 # about 3 minutes on two cores: precision.json, precision.png
    python bench/precision.py --steps 100     # shorter
    python bench/precision.py --demo-q2a      # + the README demo's q2a stage trained in each --dtype (~3 min)

A small random Llama first learns one language (a random Markov chain over 256 tokens: fp32,
lr 3e-3), the stand-in for a pretrained model; then it is fine-tuned on another chain at lr 1e-5,
as the pipeline fine-tunes Llama-3.2-1B, in three ways from the same weights and batches:

    fp32 master      train.py's --dtype bf16: fp32 weights and AdamW state, bf16 autocast matmuls
    bf16-pure        --dtype bf16-pure: bf16 weights and state, updates with stochastic rounding
    bf16 nearest     the same with round-to-nearest, what bf16 training without a master copy does

and the loss on held-out sequences of the new chain is printed every --eval-every steps. At this
lr an AdamW update is about 1e-5, far below half of bf16's step next to a weight of 0.02 (about
4e-5): round-to-nearest drops nearly every one, stochastic rounding keeps them on average.

--demo-q2a also trains the q2a classifier of `python pipeline.py --demo` with --dtype fp32, bf16
and bf16-pure (the demo's own settings otherwise) and scores each on the demo's test split (in
fp32, so that only the training precision differs).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules, one folder up from here

import data  # noqa: E402
import loss  # noqa: E402
import optim  # noqa: E402
import train  # noqa: E402
from model import Llama, LlamaConfig  # noqa: E402

CONFIG = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
MODES = ("fp32 master", "bf16-pure", "bf16 nearest")


def markov_batches(seed: int, n: int, batch: int = 16, seq: int = 64) -> list[data.Batch]:
    """n batches from a random Markov chain (each token has 8 likely successors): the language a seed names."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(CONFIG.vocab_size, CONFIG.vocab_size, generator=gen) * 3
    chain = torch.softmax(logits, -1)
    out = []
    for _ in range(n):
        ids = torch.empty(batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, CONFIG.vocab_size, (batch,), generator=gen)
        for t in range(1, seq):
            ids[:, t] = torch.multinomial(chain[ids[:, t - 1]], 1, generator=gen)[:, 0]
        out.append(data.collate([data.Example(row.int(), torch.arange(seq) > 0) for row in ids], pad_id=0))
    return out


def pretrained(steps: int) -> dict:
    torch.manual_seed(0)
    model = Llama(CONFIG).train()
    optimizer = optim.build_optimizer(model, 3e-3, 0.0, False, torch.device("cpu"))
    for batch in markov_batches(seed=1, n=steps):
        loss.forward_backward(model, [batch], autocast=False)
        optim.optimizer_step(optimizer, model.parameters(), grad_clip=1.0)
    return model.state_dict()


def fine_tune(start: dict, mode: str, batches, held_out, lr: float, eval_every: int) -> list[float]:
    """Held-out losses every eval_every steps (the first before any step) of one fine-tune."""
    model = Llama(CONFIG)
    model.load_state_dict(start)
    if mode == "fp32 master":
        optimizer = optim.build_optimizer(model, lr, 0.0, False, torch.device("cpu"))
    else:
        model = model.to(torch.bfloat16)
        optimizer = optim.BF16AdamW(model.parameters(), lr, stochastic=mode == "bf16-pure")
    model.train()
    autocast = mode == "fp32 master"
    torch.manual_seed(1)  # the same rounding noise stream for every run of a mode
    losses = [loss.validation_loss(model, held_out, autocast)]
    for step, batch in enumerate(batches, 1):
        loss.forward_backward(model, [batch], autocast)
        optim.optimizer_step(optimizer, model.parameters(), grad_clip=1.0)
        if step % eval_every == 0:
            losses.append(loss.validation_loss(model, held_out, autocast))
    return losses


def demo_q2a(out: Path, max_steps: int = 0) -> dict:
    """The demo's q2a stage in each training precision (stopped after max_steps optimizer steps;
    0: the whole stage): test accuracy and its 95 % interval."""
    import demo
    import eval as evaluation
    import pipeline
    from metrics import wilson_interval
    cfg = pipeline.demo_config(str(out))
    demo.prepare(out, cfg.demo_rows, cfg.seed)
    settings = next(spec for spec in pipeline.stage_specs(cfg, out) if spec["name"] == "q2a")["settings"]
    results = {}
    for dtype in ("fp32", "bf16", "bf16-pure"):
        folder = out / f"q2a-{dtype}"
        best = train.train(train.TrainConfig(**{**settings, "dtype": dtype}, out=str(folder), device="cpu",
                                             max_steps=max_steps))
        report = evaluation.evaluate(best, "q2a", settings["data"], split="test", out_dir=folder / "eval",
                                     device="cpu", dtype="fp32")
        n = report["n"]
        correct = round(report["accuracy"] * n)
        results[dtype] = {"accuracy": report["accuracy"], "ci95": wilson_interval(correct, n), "n": n}
    return results


def plot(result: dict, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [i * result["eval_every"] for i in range(len(result["losses"][MODES[0]]))]
    for mode in MODES:
        ax.plot(steps, result["losses"][mode], label=mode)
    ax.set(xlabel="optimizer step", ylabel="held-out loss", title=f"fine-tuning at lr {result['lr']:g}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps of each mode")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a model this small runs fastest on one)")
    p.add_argument("--out", default="precision.json", help="the JSON written; the plot goes beside it (.png)")
    p.add_argument("--demo-q2a", action="store_true", help="also the demo's q2a stage in each --dtype")
    p.add_argument("--demo-out", default="runs/precision-demo", help="where --demo-q2a builds the demo and trains")
    p.add_argument("--demo-max-steps", type=int, default=0,
                   help="stop each of --demo-q2a's runs after N optimizer steps (0: the demo's whole q2a stage)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = pretrained(args.pretrain_steps)
    batches, held_out = markov_batches(seed=2, n=args.steps), markov_batches(seed=3, n=4)
    losses = {mode: fine_tune(start, mode, batches, held_out, args.lr, args.eval_every) for mode in MODES}
    reference = losses["fp32 master"]
    drop = reference[0] - reference[-1]
    result = {"lr": args.lr, "steps": args.steps, "eval_every": args.eval_every, "losses": losses,
              "fp32_drop": drop,
              "gap_to_fp32_over_drop": {m: (losses[m][-1] - reference[-1]) / drop for m in MODES[1:]}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.out).with_suffix(".png"))
    print(f"held-out loss, fine-tuning at lr {args.lr:g} ({args.steps} steps; fp32 master falls by {drop:.4f}):")
    print("step  " + "".join(f"{m:>15}" for m in MODES))
    for i in range(len(reference)):
        print(f"{i * args.eval_every:>4}  " + "".join(f"{losses[m][i]:>15.4f}" for m in MODES))
    for mode, gap in result["gap_to_fp32_over_drop"].items():
        print(f"{mode}: final loss {gap:+.1%} of fp32 master's drop away from it")
    if args.demo_q2a:
        result["demo_q2a"] = demo_q2a(Path(args.demo_out), args.demo_max_steps)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        for dtype, r in result["demo_q2a"].items():
            low, high = r["ci95"]
            print(f"demo q2a trained in {dtype}: test accuracy {r['accuracy']:.1%} "
                  f"(95 % CI {low:.1%} to {high:.1%}, {r['n']} rows)")


if __name__ == "__main__":
    main()
