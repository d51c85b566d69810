"""FunctionVector and DistributedFV: fixed-parameter interventions on the base's kernel and
generation-step rule (generation="auto": plain runs and generate calls in one block)."""

from __future__ import annotations

import pytest
import torch

from mechsteer.fv import (
    DistributedFV,
    FunctionVector,
    function_vector,
    inject_dfv,
    inject_fv,
)
from mechsteer.interventions import DynScalar, Intervention
from mechsteer.sites import hook_name, live_hooks


def _mean_z(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 4 * torch.randn(model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head, generator=g)


def _gen(model, tokens, n=5, cache=True):
    return model.generate(tokens, max_new_tokens=n, do_sample=False, verbose=False, use_past_kv_cache=cache)


def test_fixed_parameters_are_buffers(tiny):
    mean_z = _mean_z(tiny)
    fv = FunctionVector(function_vector(tiny, mean_z, [(0, 1)]), 1, n_layers=tiny.cfg.n_layers)
    dfv = DistributedFV(mean_z, [(1, 0), (0, 2)], d_model=tiny.cfg.d_model, mode="replace")
    for iv in (fv, dfv):
        assert isinstance(iv, Intervention) and not iv.learnable
        assert iv.n_params == 0 and list(iv.parameters()) == []
        assert all(not b.requires_grad for b in iv.buffers())
    assert dfv.layers == (0, 1) and dfv.head_mask.sum() == 2
    torch.testing.assert_close(dfv.mean_z, mean_z)


def test_apply_equals_the_helpers(tiny):
    tokens, mean_z = tiny.to_tokens("The capital of France is"), _mean_z(tiny)
    vec = function_vector(tiny, mean_z, [(0, 0), (1, 1)])
    with inject_fv(tiny, vec, 0, scale=0.5):
        a = tiny(tokens)
    with FunctionVector(vec, 0, n_layers=2).apply(tiny, beta=0.5):
        b = tiny(tokens)
    assert torch.equal(a, b)
    with inject_dfv(tiny, mean_z, [(1, 2)], scale=0.3, mode="replace"):
        a = tiny(tokens)
    with DistributedFV(mean_z, [(1, 2)], d_model=tiny.cfg.d_model, mode="replace").apply(tiny, 0.3):
        b = tiny(tokens)
    assert torch.equal(a, b)


def test_mixed_lengths_in_one_block_are_each_steered_at_their_last_position(tiny):
    """Plain runs of lengths n, n+1, 1 in one block: none passes for a generation step."""
    vec = 5 * function_vector(tiny, _mean_z(tiny), [(0, 0), (1, 3)])
    texts = ["Q: a\nA:", "Q: a b\nA:", "Hi"]
    toks = [tiny.to_tokens(t) for t in texts]
    alone = []
    for t in toks:
        with inject_fv(tiny, vec, 0):
            alone.append(tiny(t))
    with inject_fv(tiny, vec, 0) as calls:
        together = [tiny(t) for t in toks]
    assert calls[f"fwd:{hook_name('resid_post', 0)}"] == len(toks)
    for a, b, t in zip(alone, together, toks):
        assert torch.equal(a, b)
        assert not torch.allclose(b[:, -1], tiny(t)[:, -1])


@pytest.mark.parametrize("every_step", [False, True])
def test_uncached_generation_equals_cached(tiny, every_step):
    tokens, mean_z = tiny.to_tokens("The capital of France is"), _mean_z(tiny)
    vec = 3 * function_vector(tiny, mean_z, [(0, 0), (0, 1), (1, 1)])
    for make in (lambda: inject_fv(tiny, vec, 0, every_step=every_step),
                 lambda: inject_dfv(tiny, mean_z, [(0, 1), (1, 2)], every_step=every_step)):
        with make():
            cached = _gen(tiny, tokens)
        with make():
            uncached = _gen(tiny, tokens, cache=False)
        assert torch.equal(cached, uncached)


def test_generate_and_plain_runs_share_a_block(tiny):
    tokens = tiny.to_tokens("The capital of France is")
    vec = 8 * function_vector(tiny, _mean_z(tiny), [(0, 0), (1, 1)])
    with inject_fv(tiny, vec, 0):
        first = _gen(tiny, tokens)
    with inject_fv(tiny, vec, 0):
        again = [_gen(tiny, tokens), _gen(tiny, tokens)]
        plain = tiny(tokens[:, :1])  # a one-token run after generate: steered, not taken for a cached step
    with inject_fv(tiny, vec, 0):
        alone = tiny(tokens[:, :1])
    assert torch.equal(plain, alone) and all(torch.equal(g, first) for g in again)
    assert not torch.equal(alone, tiny(tokens[:, :1]))
    assert "generate" not in tiny.__dict__ and live_hooks(tiny) == []


def test_base_generation_auto_for_learned_interventions(tiny):
    tokens = tiny.to_tokens("The capital of France is")
    iv = DynScalar.for_model(tiny, sites=["attn_out"], positions="last", init_std=0.5)
    with iv.apply(tiny, beta=1.0, generation=True):
        ref = _gen(tiny, tokens)
    with iv.apply(tiny, beta=1.0, generation=False):
        plain = tiny(tokens)
    with iv.apply(tiny, beta=1.0, generation="auto"):
        assert torch.equal(tiny(tokens), plain)
        assert torch.equal(_gen(tiny, tokens), ref) and torch.equal(_gen(tiny, tokens), ref)
    with pytest.raises(ValueError, match="generation"):
        with iv.apply(tiny, generation="yes"):
            pass
    assert "generate" not in tiny.__dict__


def test_bad_arguments(tiny):
    mean_z = _mean_z(tiny)
    with pytest.raises(ValueError, match="Layer"):
        FunctionVector(torch.zeros(tiny.cfg.d_model), 2, n_layers=2)
    with pytest.raises(TypeError, match="layer"):
        FunctionVector(torch.zeros(tiny.cfg.d_model), 0.5, n_layers=2)
    with pytest.raises(ValueError, match="mode"):
        DistributedFV(mean_z, [(0, 0)], d_model=tiny.cfg.d_model, mode="swap")
    with pytest.raises(ValueError, match="duplicates"):
        DistributedFV(mean_z, [(0, 0), (0, 0)], d_model=tiny.cfg.d_model)
    with pytest.raises(TypeError, match="every_step"):
        FunctionVector(torch.zeros(tiny.cfg.d_model), 0, n_layers=2, every_step="yes")
    with pytest.raises(ValueError, match="d_model"):
        with FunctionVector(torch.zeros(3), 0, n_layers=2).apply(tiny):
            tiny(tiny.to_tokens("x"))
    assert live_hooks(tiny) == []
