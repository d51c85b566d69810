"""Steered generation: apply(..., generation=True) around model.generate, and the helpers."""

from __future__ import annotations

import pytest
import torch

from mechsteer.interventions.base import steer
from mechsteer.interventions.generate import compare_generations, steered_generate
from mechsteer.interventions.scalars import ActivScalar, DynScalar
from mechsteer.interventions.vectors import SteerVec
from mechsteer.sites import live_hooks, run_with_hooks

CLASSES = [ActivScalar, SteerVec, DynScalar]
SITES = ["attn_out", "mlp_out", "resid_post", "z"]
PROMPT = "The capital of France is"
N_NEW = 6


def _build(cls, model, std, sites=SITES, **kw):
    kw.setdefault("n_pos", model.to_tokens(PROMPT).shape[1])
    iv = cls.for_model(model, sites=sites, **kw)
    with torch.no_grad():
        for p in iv.parameters():
            p.normal_(0, std)
    return iv


def _gen(model, iv, beta, cache=True, tokens=None):
    tokens = model.to_tokens(PROMPT) if tokens is None else tokens
    with iv.apply(model, beta, generation=True) as calls:
        out = model.generate(
            tokens, max_new_tokens=N_NEW, do_sample=False, stop_at_eos=False, use_past_kv_cache=cache, verbose=False
        )
    return out, calls


def _plain(model, cache=True):
    return model.generate(
        model.to_tokens(PROMPT), max_new_tokens=N_NEW, do_sample=False, stop_at_eos=False,
        use_past_kv_cache=cache, verbose=False,
    )


@pytest.mark.parametrize("cls", CLASSES)
def test_beta_zero_is_plain_generate(tiny, cls):
    iv = _build(cls, tiny, std=1.0)
    for cache in (True, False):
        assert torch.equal(_gen(tiny, iv, 0.0, cache)[0], _plain(tiny, cache))
    text = steered_generate(tiny, iv, PROMPT, beta=0.0, max_new_tokens=N_NEW)
    assert text == tiny.generate(PROMPT, max_new_tokens=N_NEW, do_sample=False, verbose=False)
    assert live_hooks(tiny) == []


@pytest.mark.parametrize("cls", CLASSES)
def test_strong_intervention_changes_text(tiny, cls):
    iv = _build(cls, tiny, std=3.0)
    out, calls = _gen(tiny, iv, 1.0)
    assert not torch.equal(out, _plain(tiny))
    # the first new token is the argmax of the steered logits on the prompt
    assert out[0, -N_NEW].item() == iv(tiny, tiny.to_tokens(PROMPT), 1.0)[0, -1].argmax().item()
    assert set(calls.values()) == {N_NEW}  # every hook fired once per generated token
    df = compare_generations(tiny, iv, PROMPT, betas=(-1, 0, 1), max_new_tokens=N_NEW, stop_at_eos=False)
    assert df["beta"].tolist() == [-1.0, 0.0, 1.0]
    assert df["text"][1] == tiny.to_string(_plain(tiny)[0]).replace("<|endoftext|>", "")
    assert df["text"][2] != df["text"][1] and df["text"][2] == tiny.tokenizer.decode(out[0], skip_special_tokens=True)
    assert all(t.endswith(c) for t, c in zip(df["text"], df["continuation"]))
    assert live_hooks(tiny) == []


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("positions", ["all", "last", [1, -2]])
def test_cached_equals_uncached(tiny, cls, positions):
    iv = _build(cls, tiny, std=1.0, positions=positions)
    cached, uncached = _gen(tiny, iv, 1.0, True)[0], _gen(tiny, iv, 1.0, False)[0]
    assert torch.equal(cached, uncached)
    # the prompt step is steered: its logits are those of the steered forward
    tokens = tiny.to_tokens(PROMPT)
    with iv.apply(tiny, 1.0, generation=True):
        first = tiny.generate(tokens, max_new_tokens=1, do_sample=False, output_logits=True, verbose=False).logits[0]
    torch.testing.assert_close(first, iv(tiny, tokens, 1.0)[:, -1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(first, tiny(tokens)[:, -1], atol=1e-3)


def test_position_bound_last_without_n_pos(tiny_llama):
    iv = _build(ActivScalar, tiny_llama, std=1.0, positions="last", n_pos=None)
    assert torch.equal(_gen(tiny_llama, iv, 1.0, True)[0], _gen(tiny_llama, iv, 1.0, False)[0])


def test_dynscalar_steers_generated_tokens(tiny_gpt2):
    """Reference: a greedy loop that reruns the steered model (every position) each step."""
    model = tiny_gpt2
    iv = _build(DynScalar, model, std=1.0)
    seq = model.to_tokens(PROMPT)
    for _ in range(N_NEW):
        seq = torch.cat([seq, iv(model, seq, 1.0)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(_gen(model, iv, 1.0)[0], seq)


def test_position_bound_leaves_generated_tokens(tiny_gpt2):
    """Reference: a greedy loop that steers only the prompt's positions of each rerun."""
    model = tiny_gpt2
    iv = _build(SteerVec, model, std=1.0, sites=["resid_post"])
    seq = model.to_tokens(PROMPT)
    n = seq.shape[1]

    def add_v(layer):
        def fn(x, hook):  # v on the prompt's positions, nothing on the generated ones
            return x + torch.cat([iv.params["resid_post"][layer], torch.zeros(x.shape[1] - n, x.shape[2])])

        return fn

    for _ in range(N_NEW):
        logits = run_with_hooks(model, seq, [(f"blocks.{l}.hook_resid_post", add_v(l)) for l in range(2)])
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(_gen(model, iv, 1.0)[0], seq)


def test_wrong_length(tiny_gpt2):
    model = tiny_gpt2
    iv = _build(ActivScalar, model, std=1.0)
    short = model.to_tokens(PROMPT)[:, 2:]
    with pytest.raises(ValueError, match=r"built for prompts of 7 tokens, got 5"), steer(model, iv, 1.0):
        model(short)
    with pytest.raises(ValueError, match="got a generation prompt of 5"):
        _gen(model, iv, 1.0, tokens=short)
    with pytest.raises(ValueError, match=r"built for prompts of 7 tokens; 'Paris' has 3"):
        steered_generate(model, iv, "Paris")
    with pytest.raises(ValueError, match="Do not pass return_type"):
        steered_generate(model, iv, PROMPT, return_type="str")
    assert live_hooks(model) == []


def test_beta_per_prompt_and_batch(tiny_gpt2):
    model = tiny_gpt2
    iv = _build(ActivScalar, model, std=2.0)
    tokens = model.to_tokens(PROMPT).repeat(2, 1)
    out, _ = _gen(model, iv, torch.tensor([0.0, 1.0]), tokens=tokens)
    assert torch.equal(out[0], _plain(model)[0])
    assert torch.equal(out[1], _gen(model, iv, 1.0)[0][0])


def test_sampling_is_seeded(tiny_gpt2):
    iv = _build(DynScalar, tiny_gpt2, std=1.0)
    a, b = (steered_generate(tiny_gpt2, iv, PROMPT, 1.0, N_NEW, seed=3, do_sample=True) for _ in range(2))
    assert a == b


@pytest.mark.integration
def test_smollm2_save_load_and_generate(smollm2, tmp_path):
    from mechsteer.interventions.io import load_intervention, save_intervention

    prompt = "The capital of France is"
    iv = _build(DynScalar, smollm2, std=2.0, sites=["mlp_out"], layers=[10, 11, 12], n_pos=None)
    back = load_intervention(save_intervention(iv, tmp_path / "iv", smollm2), smollm2)
    df = compare_generations(smollm2, back, prompt, betas=(0, 1), max_new_tokens=8)
    plain = smollm2.generate(prompt, max_new_tokens=8, do_sample=False, verbose=False)
    assert df["text"][0] == plain and df["text"][1] != plain
    assert live_hooks(smollm2) == []
