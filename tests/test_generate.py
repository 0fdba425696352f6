"""generate.py on tiny random models (CPU, fp32): the cache against recomputation, batching
against single prompts, greedy against transformers, stops and limits, sampling, the compiled
decode step and the chat command line."""
import subprocess

import pytest
import torch

import checkpoint
from generate import SamplingConfig, generate_ids, sample
from model import Llama
from tokenizer import Tokenizer
from helpers import run_script
from tiny import prompts_of, tiny_llama

GREEDY = SamplingConfig(max_new_tokens=20)


def tiny_model(seed=0, vocab=97, std=0.3, **kw) -> Llama:
    """Weights with a large std, so the logits are peaked and argmax has no near-ties."""
    return tiny_llama(vocab, seed=seed, std=std, **kw).eval()


@torch.no_grad()
def greedy_without_cache(model, prompt, max_new, stop_ids=()):
    """The reference: recompute the whole sequence for every new token."""
    ids = list(prompt)
    for _ in range(max_new):
        token = model(torch.tensor([ids]))[0, -1].argmax().item()
        if token in stop_ids:
            return ids[len(prompt):], False
        ids.append(token)
    return ids[len(prompt):], True


def replies(results):
    return [(r["ids"], r["hit_limit"]) for r in results]


# ----------------------------------------------------------------------------- greedy decoding

def test_greedy_with_cache_equals_recomputation():
    model = tiny_model()
    prompts = prompts_of([1, 4, 9, 17])
    stop = {5, 6, 7}
    out = generate_ids(model, prompts, stop, GREEDY, batch_size=4)
    assert replies(out) == [greedy_without_cache(model, p, 20, stop) for p in prompts]
    assert all(r["n_tokens"] == len(r["ids"]) for r in out)


@pytest.mark.parametrize("cfg", [GREEDY, SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=30,
                                                        top_p=0.95, seed=7)], ids=["greedy", "sampled"])
def test_batched_rows_equal_each_prompt_alone(cfg):
    model = tiny_model()
    prompts = prompts_of([3, 11, 6, 15, 1, 8])
    stop = set(range(8))                               # rows stop at different steps: rows get dropped
    batched = generate_ids(model, prompts, stop, cfg, batch_size=6)
    alone = [generate_ids(model, [p], stop, cfg, keys=[i])[0] for i, p in enumerate(prompts)]
    assert replies(batched) == replies(alone)
    assert len({r["n_tokens"] for r in batched}) > 2  # the rows did end at different steps
    reordered = generate_ids(model, prompts[::-1], stop, cfg, batch_size=4, keys=range(5, -1, -1))
    assert replies(reordered) == replies(batched)[::-1]


def test_finished_rows_hand_their_place_to_waiting_prompts(monkeypatch):
    """Continuous batching: 2 rows at a time through 7 prompts, each new prompt prefilled and
    inserted where a row finished; every reply is the one its prompt gets alone."""
    import generate
    model = tiny_model()
    prompts = prompts_of([3, 11, 6, 15, 1, 8, 4])
    stop = set(range(8))
    alone = [generate_ids(model, [p], stop, GREEDY)[0] for p in prompts]
    admitted = []
    real_prefill = generate.prefill
    monkeypatch.setattr(generate, "prefill", lambda m, ps: admitted.append(len(ps)) or real_prefill(m, ps))
    finish_order = [i for i, _ in generate.generate_stream(model, prompts, stop, GREEDY, batch_size=2)]
    assert admitted[0] == 2 and sum(admitted) == 7 and len(admitted) > 3   # refilled as rows finished
    assert sorted(finish_order) == list(range(7))
    assert replies(generate_ids(model, prompts, stop, GREEDY, batch_size=2)) == replies(alone)
    # With 16 rows, places are refilled once 2 (an eighth) are free: one prefill serves both.
    admitted.clear()
    many = prompts_of([(7 * i) % 19 + 1 for i in range(40)], seed=2)
    out = generate_ids(model, many, stop, GREEDY, batch_size=16)
    assert admitted[0] == 16 and sum(admitted) == 40 and min(admitted[1:-1]) >= 2
    assert replies(out) == replies([generate_ids(model, [p], stop, GREEDY)[0] for p in many])


def test_greedy_equals_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
        initializer_range=0.3, tie_word_embeddings=True, bos_token_id=1, eos_token_id=[2, 3],
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        attn_implementation="eager")
    ref = transformers.LlamaForCausalLM(hf_config).eval()
    ref.save_pretrained(tmp_path / "hf")
    ours = checkpoint.load_model(tmp_path / "hf").eval()
    prompts = prompts_of([5, 12, 7], vocab=101, seed=3)
    cfg = SamplingConfig(max_new_tokens=30)
    out = generate_ids(ours, prompts, {2, 3}, cfg, batch_size=3)
    for prompt, r in zip(prompts, out):
        with torch.no_grad():
            seq = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               do_sample=False, max_new_tokens=30, eos_token_id=[2, 3], pad_token_id=0)
        new = seq[0, len(prompt):].tolist()
        assert r["hit_limit"] == (new[-1] not in (2, 3))
        assert r["ids"] == (new if r["hit_limit"] else new[:-1])
        assert r["n_tokens"] >= 10                     # the comparison covers a real stretch of tokens


# ----------------------------------------------------------------------------- stops and limits

def test_stop_ends_one_row_while_others_go_on():
    model = tiny_model()
    prompts = prompts_of([4, 9, 6])
    free = generate_ids(model, prompts, set(), SamplingConfig(max_new_tokens=12))
    assert all(r["hit_limit"] and r["n_tokens"] == 12 for r in free)
    # a token that row 0 produces mid-way and row 1 never produces
    stop = next(t for t in free[0]["ids"][3:] if t not in free[1]["ids"])
    out = generate_ids(model, prompts, {stop}, SamplingConfig(max_new_tokens=12))
    for f, r in zip(free, out):
        ids = f["ids"]
        expected = (ids[:ids.index(stop)], False) if stop in ids else (ids, True)
        assert (r["ids"], r["hit_limit"]) == expected
    assert not out[0]["hit_limit"] and out[1] == free[1]
    capped = generate_ids(model, prompts, set(), SamplingConfig(max_new_tokens=3))
    assert [r["ids"] for r in capped] == [f["ids"][:3] for f in free]


def test_empty_prompt_and_bad_config_are_errors():
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_ids(tiny_model(), [[1, 2], []], set(), GREEDY)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)


# ----------------------------------------------------------------------------- sampling

def test_seeded_sampling_is_reproducible_and_top_k1_top_p_small_are_greedy():
    model = tiny_model(std=0.1)                        # flatter logits: sampling has choices
    prompts = prompts_of([3, 7, 5])
    sampled = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=11)
    first = generate_ids(model, prompts, set(), sampled)
    assert replies(generate_ids(model, prompts, set(), sampled)) == replies(first)
    other = generate_ids(model, prompts, set(), SamplingConfig(max_new_tokens=20, temperature=1.0, seed=12))
    assert replies(other) != replies(first)
    greedy = replies(generate_ids(model, prompts, set(), GREEDY))
    assert replies(first) != greedy
    for cfg in (SamplingConfig(max_new_tokens=20, temperature=1.5, top_k=1, seed=11),
                SamplingConfig(max_new_tokens=20, temperature=1.5, top_p=1e-6, seed=11)):
        assert replies(generate_ids(model, prompts, set(), cfg)) == greedy


def test_sample_follows_the_distribution_and_truncates():
    probs = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05])
    logits = probs.log().expand(1000, 5)
    u = (torch.arange(1000) + 0.5) / 1000                # an even grid over [0, 1)
    counts = torch.bincount(sample(logits, u, SamplingConfig(temperature=1.0)), minlength=5)
    torch.testing.assert_close(counts / 1000, probs, atol=2e-3, rtol=0)
    top2 = sample(logits, u, SamplingConfig(temperature=1.0, top_k=2))
    assert set(top2.tolist()) == {1, 3}
    assert (top2 == 1).sum() == 625                    # 0.5 / (0.5 + 0.3) of the grid
    nucleus = sample(logits, u, SamplingConfig(temperature=1.0, top_p=0.7))
    assert set(nucleus.tolist()) == {1, 3}             # 0.5 < 0.7 <= 0.5 + 0.3
    assert set(sample(logits, u, SamplingConfig(temperature=1.0, top_p=0.5)).tolist()) == {1}
    cold = sample(logits, u, SamplingConfig(temperature=0.05))
    assert (cold == 1).float().mean() > 0.99


def test_compiled_decode_step_gives_the_same_tokens_from_one_graph(fresh_dynamo):
    """torch.compile with inductor (on CPU: generated C++) over a static cache: the same replies,
    through refills and idle rows at the end, from one graph that never recompiles (what lets
    CUDA replay each step as one graph)."""
    import generate
    model = tiny_model()
    prompts = prompts_of([3, 11, 6, 15, 1, 8, 4])
    expected = generate_ids(model, prompts, set(range(8)), GREEDY, batch_size=3)
    compiled = generate.compiled_decoder("cpu")
    assert compiled.static and generate.EAGER == generate.Decoder()  # nothing global changed
    compiled_step, calls = compiled.step, []

    def step(*args):
        """The first call compiles; any compile after it raises (torch's public stance API, set
        for each call only: nothing stays switched on)."""
        calls.append(len(args[1]))
        if len(calls) == 1:
            return compiled_step(*args)
        with torch.compiler.set_stance("fail_on_recompile"):
            return compiled_step(*args)

    decoder = generate.Decoder(step, static=True)
    assert generate_ids(model, prompts, set(range(8)), GREEDY, batch_size=3, decoder=decoder) == expected
    assert len(calls) > 10 and set(calls) == {3}
    # The stance does catch a recompile: another batch size is another shape (dynamic=False).
    with torch.inference_mode(), pytest.raises(RuntimeError, match="fail_on_recompile"):
        step(model, torch.zeros(2, dtype=torch.long), model.new_cache(2, 30, static=True))


def test_compile_without_a_cpu_compiler_is_one_clear_error(monkeypatch):
    import generate
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(generate.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="--compile on a CPU needs a C\\+\\+ compiler"):
        generate.compiled_decoder("cpu")


# ----------------------------------------------------------------------------- command line (real subprocesses)

def run_cli(*args, check=True) -> subprocess.CompletedProcess:
    return run_script("generate.py", *args, check=check)


def test_cli_prompt_streams_the_reply_and_help_runs(model_dir):
    from generate import generate
    proc = run_cli("--model", model_dir, "--prompt", "my friend is happy", "--system", "be brief",
                   "--max-new-tokens", 12)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "my friend is happy"}]
    expected = generate(checkpoint.load_model(model_dir).eval(), Tokenizer(model_dir), [messages],
                        SamplingConfig(max_new_tokens=12), progress=False)[0]
    assert expected["n_tokens"] > 0 and proc.stdout == expected["text"] + "\n"
    help_text = run_cli("--help").stdout
    assert "--prompt" in help_text and "greedy" in help_text
