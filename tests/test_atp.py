"""Attribution patching: against TransformerLens' implementation, against finite differences
(the estimate is a directional derivative), and against real activation patching."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from transformer_lens import patching as tl_patching
from transformer_lens.tools.analysis.attribution_patching import attribution_patch, cache_activation_and_gradient

from mechsteer.attribution.atp import attribution_patching, attribution_patching_all
from mechsteer.attribution.compare import spearman
from mechsteer.metrics import DATASET_METRICS, logit_diff
from mechsteer.sites import hook_name, hooked, live_hooks
from mechsteer.tasks import ioi
from mechsteer.tiny import tiny_model

SITES = ("resid_pre", "attn_out", "mlp_out", "z")


@pytest.fixture(scope="module")
def ds_of():
    cache = {}

    def get(model, n=4):
        key = (id(model), n)
        if key not in cache:
            cache[key] = ioi(model, n=n)
        return cache[key]

    return get


@contextlib.contextmanager
def params_require_grad(model):
    """TL's gradient cache differentiates through the parameters' graph; mechsteer turns
    requires_grad off, so switch it on for the reference run only."""
    params = list(model.parameters())
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p in params:
            p.requires_grad_(False)


def test_matches_transformer_lens_attribution_patch(tiny, ds_of):
    """TL scores one pair at a time as (a_clean - a_corr) . grad_corr (denoising, not
    normalised). mechsteer's denoising score times (m_clean - m_corr) is the mean of
    TL's; its per-prompt score times that prompt's gap is TL's; noising is TL with
    clean and corrupted swapped, negated."""
    ds = ds_of(tiny, n=2)
    B, L, H, P = len(ds), tiny.cfg.n_layers, tiny.cfg.n_heads, ds.n_pos
    clean, corr = ds.logit_diffs(tiny)
    for direction in ("denoising", "noising"):
        out = attribution_patching_all(tiny, ds, sites=("z", "mlp_out"), direction=direction, per_prompt=True)
        tl_z, tl_mlp = torch.zeros(B, L, H, P), torch.zeros(B, L, P)
        for i in range(B):
            pair = (ds.tokens[i : i + 1], ds.corrupted_tokens[i : i + 1])
            a, b = pair if direction == "denoising" else pair[::-1]
            fn = lambda lg, i=i: logit_diff(lg, ds.correct[i : i + 1], ds.wrong[i : i + 1])  # noqa: E731
            with params_require_grad(tiny):
                scores = attribution_patch(tiny, a, b, fn).node_scores
            for node, v in scores.items():
                if node.kind == "attn_head_out":
                    tl_z[i, node.layer, node.head, node.position] = v
                elif node.kind == "mlp_out":
                    tl_mlp[i, node.layer, node.position] = v
        sign = 1.0 if direction == "denoising" else -1.0
        gap = (clean - corr).reshape(B, 1, 1, 1)
        for site, ref in (("z", tl_z), ("mlp_out", tl_mlp)):
            r = out[site]
            g = gap.reshape(B, *[1] * (ref.ndim - 1))
            torch.testing.assert_close(r.per_prompt * g, sign * ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(r.scores * (clean - corr).mean(), sign * ref.mean(0), atol=1e-4, rtol=1e-4)


def test_matches_transformer_lens_gradient_cache(tiny, ds_of):
    """resid_pre and attn_out are not TL nodes: compare every site with scores built from
    TL's gradient cache (batched, noising)."""
    ds = ds_of(tiny)
    out = attribution_patching_all(tiny, ds, sites=SITES)
    ref = _tl_noising_scores(tiny, ds, SITES)
    for s in SITES:
        torch.testing.assert_close(out[s].scores, ref[s], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny64():
    """Float64 copies of the tiny models: random weights give a clean-vs-corrupted gap of
    ~1e-3, and normalising a float32 finite difference by it amplifies rounding too much."""
    return {kind: tiny_model(kind).to(torch.float64) for kind in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def atp64(tiny64, ds_of):
    """Noising AtP of every site on the float64 models, computed once per model."""
    return {k: attribution_patching_all(m, ds_of(m), sites=SITES) for k, m in tiny64.items()}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "site,layer,head", [("attn_out", 0, None), ("resid_pre", 1, None), ("mlp_out", 0, None), ("z", 0, 1)]
)
def test_estimate_is_the_directional_derivative(tiny64, atp64, ds_of, kind, site, layer, head):
    """A small step from the clean activation toward the corrupted one: the metric's
    central difference equals AtP's estimate (the definition, noising)."""
    model = tiny64[kind]
    ds = ds_of(model)
    pos = ds.n_pos - 1  # a cell with a large effect, so the check is sharp
    res = atp64[kind][site]
    name = hook_name(site, layer)
    _, cache = model.run_with_cache(ds.corrupted_tokens, names_filter=[name])
    a_corr = cache[name]
    gap = res.meta["clean_metric"] - res.meta["corrupted_metric"]
    idx = (slice(None), pos) if head is None else (slice(None), pos, head)

    def metric_at(t: float) -> float:
        def step(x, hook):
            x = x.clone()
            x[idx] = x[idx] + t * (a_corr[idx] - x[idx])
            return x

        with torch.no_grad(), hooked(model, [(name, step)]):
            return logit_diff(model(ds.tokens), ds.correct, ds.wrong).item()

    eps = 1e-2  # llama's RMSNorm computes in float32 even in a float64 model
    deriv = (metric_at(eps) - metric_at(-eps)) / (2 * eps)
    r = res.scores[layer, pos] if head is None else res.scores[layer, head, pos]
    assert r.item() == pytest.approx(-deriv / gap, rel=1e-3)
    assert r.abs() > 1e-2  # a non-trivial cell


@pytest.mark.parametrize("site", ["resid_pre"])
def test_ranks_like_real_activation_patching(tiny_gpt2, ds_of, site):
    """On an easy case (IOI on GPT-2: one token differs), AtP ranks (layer, pos) cells like
    activation patching done by TransformerLens (noising: corrupted activations patched
    into the clean run, normalised as mechsteer does)."""
    model, ds = tiny_gpt2, ds_of(tiny_gpt2)
    sweep = {"resid_pre": tl_patching.get_act_patch_resid_pre, "attn_out": tl_patching.get_act_patch_attn_out}[site]
    fn = lambda lg: logit_diff(lg, ds.correct, ds.wrong)  # noqa: E731
    with torch.no_grad():
        _, corr_cache = model.run_with_cache(ds.corrupted_tokens, names_filter=lambda n: n.endswith(f"hook_{site}"))
        m_clean, m_corr = fn(model(ds.tokens)), fn(model(ds.corrupted_tokens))
        patched = sweep(model, ds.tokens, corr_cache, fn)
    real = (m_clean - patched) / (m_clean - m_corr)
    atp = attribution_patching(model, ds, site=site)
    assert spearman(atp.flat(), real.flatten().cpu()) > 0.5
    assert live_hooks(model) == []


def test_all_sites_equal_single_site_calls_and_shapes(tiny, ds_of):
    ds = ds_of(tiny)
    L, H, P = tiny.cfg.n_layers, tiny.cfg.n_heads, ds.n_pos
    out = attribution_patching_all(tiny, ds, sites=SITES, direction="denoising")
    assert set(out) == set(SITES)
    for site in SITES:
        if site in ("z", "attn_out"):
            single = attribution_patching(tiny, ds, site=site, direction="denoising")
            torch.testing.assert_close(out[site].scores, single.scores, atol=1e-6, rtol=1e-5)
        expected = (L, H, P) if site == "z" else (L, P)
        assert tuple(out[site].scores.shape) == expected
        assert out[site].labels["pos"] == ds.labels and out[site].method == "atp"
        assert out[site].per_prompt is None
    # a head's total over positions is patching it everywhere: same as summing z cells
    assert out["z"].sum("pos").axes == ("layer", "head")
    assert live_hooks(tiny) == []


def test_per_prompt_and_custom_metric(tiny_gpt2, ds_of):
    ds = ds_of(tiny_gpt2)
    r = attribution_patching(tiny_gpt2, ds, site="attn_out", per_prompt=True)
    assert tuple(r.per_prompt.shape) == (len(ds), *r.scores.shape)
    clean, corr = ds.logit_diffs(tiny_gpt2)
    gap = (clean - corr).reshape(-1, 1, 1)
    # per-prompt scores times each prompt's gap average back to the mean-metric score
    torch.testing.assert_close((r.per_prompt * gap).mean(0) / (clean - corr).mean(), r.scores, atol=1e-5, rtol=1e-4)

    def summed(logits, ds):
        return logit_diff(logits, ds.correct, ds.wrong, reduce="sum")

    custom = attribution_patching(tiny_gpt2, ds, site="attn_out", metric=summed)
    # normalised scores do not depend on the metric's scale
    torch.testing.assert_close(custom.scores, r.scores, atol=1e-5, rtol=1e-4)
    assert custom.metric == "summed"
    # a metric name is its function of DATASET_METRICS
    named = attribution_patching(tiny_gpt2, ds, site="attn_out", metric="logit")
    by_fn = attribution_patching(tiny_gpt2, ds, site="attn_out", metric=DATASET_METRICS["logit"])
    assert named.metric == "logit" and named.method == "atp" and named.meta["direction"] == "noising"
    torch.testing.assert_close(named.scores, by_fn.scores)
    assert attribution_patching(tiny_gpt2, ds, site="attn_out", metric="logit_diff").metric == "logit_diff"


def test_bad_input_is_a_clear_error(tiny_gpt2, ds_of):
    ds = ds_of(tiny_gpt2)
    with pytest.raises(ValueError, match="Did you mean 'attn_out'"):
        attribution_patching(tiny_gpt2, ds, site="attn_outt")
    with pytest.raises(ValueError, match="does not support site 'pattern'"):
        attribution_patching(tiny_gpt2, ds, site="pattern")
    with pytest.raises(ValueError, match="direction"):
        attribution_patching(tiny_gpt2, ds, direction="sideways")
    with pytest.raises(ValueError, match="scalar"):
        attribution_patching(tiny_gpt2, ds, metric=lambda lg, d: lg[:, -1, 0])
    with pytest.raises(ValueError, match="Unknown metric 'prob'"):
        attribution_patching(tiny_gpt2, ds, metric="prob")
    with pytest.raises(ValueError, match="per_prompt"):
        attribution_patching(tiny_gpt2, ds, metric=lambda lg, d: lg.mean(), per_prompt=True)
    with pytest.raises(ValueError, match="at least one site"):
        attribution_patching_all(tiny_gpt2, ds, sites=())
    same = dataclasses.replace(ds, corrupted_tokens=ds.tokens)
    with pytest.raises(ValueError, match="do(es)? not separate"):
        attribution_patching(tiny_gpt2, same)
    assert live_hooks(tiny_gpt2) == []


def _tl_noising_scores(model, ds, sites):
    """Noising AtP from TL's gradient cache: -(a_corr - a_clean) . grad_clean / gap."""
    names = {s: [hook_name(s, l) for l in range(model.cfg.n_layers)] for s in sites}
    flat = [n for s in sites for n in names[s]]
    fn = lambda lg: logit_diff(lg, ds.correct, ds.wrong)  # noqa: E731  (mean, like mechsteer's)
    with params_require_grad(model), torch.enable_grad():
        g_clean = cache_activation_and_gradient(model, ds.tokens, fn, names_filter=flat)
    corr = cache_activation_and_gradient(model, ds.corrupted_tokens, fn, names_filter=flat, compute_gradient=False)
    gap = g_clean.metric - corr.metric
    out = {}
    for s in sites:
        per_layer = []
        for n in names[s]:
            d = ((corr.activations[n] - g_clean.activations[n]) * g_clean.gradients[n]).sum((0, -1))  # (pos[, head])
            per_layer.append(-(d.T if d.ndim == 2 else d) / gap)
        out[s] = torch.stack(per_layer)
    return out


@pytest.mark.integration
def test_smollm2_all_sites_match_transformer_lens(smollm2):
    """On the real model (GQA, 30 layers), every site's scores equal those built from TL's
    gradient cache, to 1e-4 of the largest score."""
    ds = ioi(smollm2, n=2)
    sites = ("resid_pre", "attn_out", "mlp_out", "z")
    out = attribution_patching_all(smollm2, ds, sites=sites)
    ref = _tl_noising_scores(smollm2, ds, sites)
    for s in sites:
        scale = ref[s].abs().max().item()
        torch.testing.assert_close(out[s].scores, ref[s].cpu(), atol=1e-4 * max(1.0, scale), rtol=1e-3)
    assert live_hooks(smollm2) == []
