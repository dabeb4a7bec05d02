"""KV-cache generation against recomputing the whole sequence without a cache, sampling, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import moelab
from moelab.cli import main
from moelab.errors import MoelabError
from moelab.generate import generate, generate_steps, next_token, sampling_probs

VOCAB = 64


def tiny_model(seed: int = 0, **model_overrides) -> torch.nn.Module:
    """A random tiny OLMoE; init_std 0.1 keeps argmax margins far above float rounding."""
    model = {
        "vocab_size": VOCAB,
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "d_expert": 16,
        "n_experts": 8,
        "top_k": 2,
        "max_seq_len": 64,
        "pad_token_id": 1,
        "eos_token_id": VOCAB - 1,
        "init_std": 0.1,
        **model_overrides,
    }
    torch.manual_seed(seed)
    return moelab.build(moelab.load_config({"model": model})).eval()


MODELS = {
    "sdpa": {},
    "eager": {"attention": "eager"},
    "shared+dense": {"n_shared_experts": 1, "n_dense_layers": 1, "d_dense": 48},
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return tiny_model(**MODELS[request.param])


def prompt_ids(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (n,), generator=g).tolist()


@torch.no_grad()
def greedy_without_cache(model, prompt: list[int], n_new: int) -> list[int]:
    """Reference: recompute the whole sequence at every step and take the argmax of the last logits."""
    seq = list(prompt)
    for _ in range(n_new):
        logits = model(torch.tensor([seq])).logits[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(prompt) :]


def test_greedy_with_cache_equals_recomputing_without_cache(model):
    prompt = prompt_ids(7)
    expected = greedy_without_cache(model, prompt, 12)
    assert generate(model, prompt, max_new_tokens=12) == expected
    assert len(set(expected)) > 1  # a degenerate model repeating one token would prove little


def test_prefill_is_one_call_then_one_token_per_step(model):
    shapes = []
    handle = model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    try:
        ids = generate(model, prompt_ids(5), max_new_tokens=4)
    finally:
        handle.remove()
    assert len(ids) == 4
    assert shapes == [(1, 5), (1, 1), (1, 1), (1, 1)]  # the last token is never fed back


def test_logits_and_routing_with_cache_equal_a_full_forward(model):
    prompt = prompt_ids(6, seed=2)
    steps = list(generate_steps(model, prompt, max_new_tokens=5))
    seq = prompt + [int(s.token) for s in steps]
    with torch.no_grad():
        full = model(torch.tensor([seq[:-1]]))  # every position that was fed, in one call, no cache
    n = len(prompt)
    # step 0 covers the prompt positions, step i (i >= 1) the single position n + i - 1
    spans = [(0, n)] + [(n + i - 1, n + i) for i in range(1, len(steps))]
    for step, (a, b) in zip(steps, spans, strict=True):
        torch.testing.assert_close(step.output.logits[0], full.logits[0, a:b], atol=1e-5, rtol=1e-5)
        assert len(step.output.routing) == len(full.routing) == model.cfg.n_layers
        for cached, ref in zip(step.output.routing, full.routing, strict=True):
            assert torch.equal(cached.topk_ids, ref.topk_ids[a:b])
            torch.testing.assert_close(cached.topk_weights, ref.topk_weights[a:b], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(cached.router_logits, ref.router_logits[a:b], atol=1e-5, rtol=1e-5)


def test_context_end_caps_new_tokens_and_stays_exact():
    model = tiny_model(max_seq_len=16)
    prompt = prompt_ids(14)
    # positions 0..15 can be fed; the prediction at position 15 is the 3rd and last new token
    ids = generate(model, prompt, max_new_tokens=10)
    assert ids == greedy_without_cache(model, prompt, 3)
    assert len(generate(model, prompt_ids(16), max_new_tokens=10)) == 1


def test_prompt_longer_than_max_seq_len_is_refused():
    model = tiny_model(max_seq_len=16)
    with pytest.raises(MoelabError, match="max_seq_len"):
        generate(model, prompt_ids(17), max_new_tokens=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt_ids": []}, "empty"),
        ({"prompt_ids": [3, VOCAB]}, "vocabulary"),
        ({"prompt_ids": [3, 1.5]}, "integer"),
        ({"prompt_ids": torch.zeros(2, 3, dtype=torch.long)}, "one sequence"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
    ],
)
def test_bad_arguments_raise_moelab_error(kwargs, match):
    args = {"prompt_ids": [3, 4], "max_new_tokens": 2, **kwargs}
    with pytest.raises(MoelabError, match=match):
        generate(tiny_model(), **args)


def test_tensor_prompts_equal_list_prompts_and_zero_tokens_is_empty():
    model = tiny_model()
    prompt = prompt_ids(5)
    expected = generate(model, prompt, max_new_tokens=3)
    assert generate(model, torch.tensor(prompt), max_new_tokens=3) == expected
    assert generate(model, torch.tensor([prompt]), max_new_tokens=3) == expected
    assert generate(model, prompt, max_new_tokens=0) == []


def test_generation_restores_training_mode_and_grad_mode():
    model = tiny_model().train()
    generate(model, prompt_ids(4), max_new_tokens=2)
    assert model.training
    assert torch.is_grad_enabled()


def test_eos_stops_early_and_is_included():
    model = tiny_model()
    prompt = prompt_ids(5)
    free = generate(model, prompt, max_new_tokens=12)
    eos = free[4]
    expected = free[: free.index(eos) + 1]
    assert len(expected) < len(free)
    assert generate(model, prompt, max_new_tokens=12, eos_token_id=eos) == expected
    sampled = generate(model, prompt, 12, temperature=1.0, seed=3)
    stop = sampled[2]
    assert (
        generate(model, prompt, 12, temperature=1.0, seed=3, eos_token_id=stop)
        == (sampled[: sampled.index(stop) + 1])
    )


def test_tiny_top_p_is_greedy():
    model = tiny_model()
    prompt = prompt_ids(5)
    greedy = generate(model, prompt, max_new_tokens=10)
    for seed in (0, 1, 2):
        assert generate(model, prompt, 10, temperature=1.5, top_p=1e-6, seed=seed) == greedy


def test_same_seed_same_samples_other_seed_other_samples():
    model = tiny_model()
    prompt = prompt_ids(5)
    a = generate(model, prompt, 20, temperature=1.0, seed=7)
    assert generate(model, prompt, 20, temperature=1.0, seed=7) == a
    assert generate(model, prompt, 20, temperature=1.0, seed=8) != a  # P(equal) ~ 1e-20 for this model
    assert a != generate(model, prompt, 20)  # sampling is not greedy


def test_sampling_probs_by_hand():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    torch.testing.assert_close(sampling_probs(logits, 1.0, 1.0), probs)
    # nucleus 0.7: 0.5 alone is below 0.7, so 0.3 joins; renormalised over 0.8
    torch.testing.assert_close(sampling_probs(logits, 1.0, 0.7), torch.tensor([[0.625, 0.0, 0.375, 0.0]]))
    torch.testing.assert_close(sampling_probs(logits, 1.0, 0.9), torch.tensor([[0.5, 0.0, 0.3, 0.15]]) / 0.95)
    # temperature 2 on logits l: softmax(l / 2) ∝ sqrt(p)
    sqrt = probs.sqrt()
    torch.testing.assert_close(sampling_probs(logits, 2.0), sqrt / sqrt.sum())


def test_sampled_frequencies_follow_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0])
    expected = sampling_probs(logits[None], 0.7, 0.95)[0]
    assert expected[-1] == 0 and expected[-2] == 0  # the nucleus drops the tail
    n = 40_000
    g = torch.Generator().manual_seed(0)
    samples = next_token(logits.expand(n, -1), temperature=0.7, top_p=0.95, generator=g)
    freq = torch.bincount(samples, minlength=5).float() / n
    # 5 standard errors of a binomial proportion
    tol = 5 * (expected * (1 - expected) / n).sqrt() + 1e-9
    assert ((freq - expected).abs() <= tol).all(), (freq, expected)


# ----------------------------------------------------------------------------- the CLI


def test_cli_generate_prompt_ids_json_equals_library(tmp_path, capsys):
    model = tiny_model(**MODELS["shared+dense"])
    ckpt = moelab.save_checkpoint(model, tmp_path / "ckpt")
    args = ["generate", str(ckpt), "--prompt-ids", "3,4,5", "--max-new-tokens", "5", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    expected = generate(model, [3, 4, 5], max_new_tokens=5, eos_token_id=model.cfg.eos_token_id)
    assert out["prompt_ids"] == [3, 4, 5]
    assert out["ids"] == expected
    assert out["text"] is None
    # sampling flags reach the library too
    argv = args + ["--temperature", "0.8", "--top-p", "0.9", "--seed", "5"]
    assert main(argv) == 0
    sampled = json.loads(capsys.readouterr().out)["ids"]
    kwargs = {"temperature": 0.8, "top_p": 0.9, "seed": 5, "eos_token_id": model.cfg.eos_token_id}
    assert sampled == generate(model, [3, 4, 5], 5, **kwargs)


def test_cli_prompt_text_without_tokenizer_is_a_one_line_error(tmp_path, capsys):
    ckpt = moelab.save_checkpoint(tiny_model(), tmp_path / "ckpt")
    assert main(["generate", str(ckpt), "--prompt", "hello", "--max-new-tokens", "2"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("moelab: error:") and "tokenizer.json" in err
