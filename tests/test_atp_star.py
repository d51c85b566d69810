"""AtP* (QK fix, GradDrop), path-integrated AtP and the false-negative evaluation: each
checked against the identity that defines it (plain AtP, real patching)."""

from __future__ import annotations

import json

import pytest
import torch

from mechsteer import runs

from mechsteer.attribution import (
    activation_patching,
    attribution_patching,
    attribution_patching_all,
    atp_ig_all,
    atp_star_all,
    false_negatives,
    run_suite,
)
from mechsteer.attribution.result import AttributionResult
from mechsteer.metrics import per_prompt_metric
from mechsteer.sites import hook_name, hooked
from mechsteer.tasks import ioi
from mechsteer.tiny import tiny_model

KINDS = ("gpt2", "llama")


@pytest.fixture(scope="module", params=KINDS)
def setup(request):
    model = tiny_model(request.param)
    return model, ioi(model, n=3)


def _close(a, b, tol=1e-4):
    torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)


def test_no_fix_no_drop_is_plain_atp(setup):
    model, ds = setup
    sites = ("attn_out", "mlp_out", "z")
    plain = attribution_patching_all(model, ds, sites=sites)
    for kw in ({"qk_fix": False, "grad_drop": False}, {"drop_layers": ()}):  # GradDrop dropping nothing = AtP
        star = atp_star_all(model, ds, sites=sites, **kw)
        for s in sites:
            _close(star[s].scores, plain[s].scores)


def test_linearised_softmax_qk_fix_equals_atp_on_queries_and_keys(setup):
    """With the softmax replaced by its linear map at the clean run, the QK fix is AtP
    (scores are linear in one patched query or key, so only the softmax differs)."""
    model, ds = setup
    lin = atp_star_all(model, ds, sites=("q", "k"), grad_drop=False, rule="linear")
    plain = atp_star_all(model, ds, sites=("q", "k"), grad_drop=False, qk_fix=False)
    for s in ("q", "k"):
        assert plain[s].scores.abs().max() > 0
        _close(lin[s].scores, plain[s].scores, 1e-3)


def _patched_pattern_change(model, ds, layer, site, pos, head):
    """(A_patched - A) . dm/dA of layer ``layer`` for one real query/key patch (noising),
    normalised as AtP scores: the QK fix must equal this for that node."""
    key = (site, layer)
    _, src = runs.cache_at(model, ds.corrupted_tokens, [key])

    def patch(x, hook):
        x = x.clone()
        x[:, pos, head] = src[key][:, pos, head]
        return x

    with hooked(model, [(hook_name(site, layer, model), patch)]):
        _, patched = runs.cache_at(model, ds.tokens, [("pattern", layer)])
    value, acts, grads = runs.grad_at(model, ds.tokens, [("pattern", layer)], lambda lg: per_prompt_metric(lg, ds))
    _, corr = runs.cache_at(model, ds.corrupted_tokens, [("pattern", layer)])
    m_corr = ds.logit_diffs(model)[1]
    change = ((patched[("pattern", layer)] - acts[("pattern", layer)]) * grads[("pattern", layer)]).sum((1, 2, 3))
    return -change.mean() / (value.mean() - m_corr.mean())


@pytest.mark.parametrize("site", ["q", "k"])
def test_qk_fix_equals_real_patch_of_one_query_or_key(setup, site):
    model, ds = setup
    star = atp_star_all(model, ds, sites=(site,), grad_drop=False)[site]
    pos = int((ds.tokens[0] != ds.corrupted_tokens[0]).nonzero()[0]) + (1 if site == "q" else 0)
    for layer, head in ((1, 0), (1, 1), (0, 1)):
        want = _patched_pattern_change(model, ds, layer, site, pos, head)
        _close(star.scores[layer, head, pos], want, 1e-4)


def test_graddrop_terms(setup):
    """Last-layer nodes: every drop below them changes nothing, so GradDrop = AtP there."""
    model, ds = setup
    plain = attribution_patching(model, ds, site="mlp_out")
    star = atp_star_all(model, ds, sites=("mlp_out",), qk_fix=False)["mlp_out"]
    _close(star.scores[-1], plain.scores[-1])
    assert star.method == "atp*" and star.meta["backward_passes"] == model.cfg.n_layers


def test_ig_one_step_is_atp(setup):
    model, ds = setup
    sites = ("resid_pre", "attn_out", "z")
    plain = attribution_patching_all(model, ds, sites=sites)
    ig = atp_ig_all(model, ds, sites=sites, steps=1)
    for s in sites:
        _close(ig[s].scores, plain[s].scores)
        assert ig[s].method == "atp-ig"


def test_ig_converges_to_patching_where_the_path_is_straight(setup):
    """The IG path moves the token embeddings; each prompt differs in one token, so at
    resid_pre of layer 0 the path of the changed cell is straight: IG -> real patching."""
    model, ds = setup
    exact = activation_patching(model, ds, site="resid_pre", progress=False).scores[0]
    errs = [(atp_ig_all(model, ds, sites=("resid_pre",), steps=k)["resid_pre"].scores[0] - exact).abs().max().item()
            for k in (4, 16, 64)]
    assert errs[1] < 0.3 * errs[0] and errs[2] < 0.3 * errs[1]  # left Riemann sum: error ~ 1/K
    assert errs[2] < 0.05 * exact.abs().max().item()


def test_variants_through_attribution_patching(setup):
    model, ds = setup
    assert attribution_patching(model, ds, site="z", variant="atp*").method == "atp*"
    assert attribution_patching(model, ds, site="mlp_out", variant="ig", steps=2).method == "atp-ig"
    with pytest.raises(ValueError, match="variant"):
        attribution_patching(model, ds, variant="atp**")
    with pytest.raises(ValueError, match="residual stream"):
        attribution_patching(model, ds, site="resid_pre", variant="atp*")


def test_false_negatives_counts_and_ranks():
    exact = AttributionResult(torch.tensor([[5.0, -4.0, 3.0], [0.1, 0.2, 0.0]]), ("layer", "pos"), "patching")
    est = AttributionResult(torch.tensor([[0.0, -4.0, 3.0], [0.1, 9.0, 0.0]]), ("layer", "pos"), "atp")
    fn = false_negatives(exact, est, ks=(2, 3))
    assert fn.loc[fn.k == 2, "missed"].item() == 1  # (0, 0) is true top-2 but rank 5 by the estimate
    row = fn[fn.k == 3].iloc[0]
    assert row["missed"] == 1 and row["ranks"] == [5, 2, 3]


def test_suite_runs_new_methods_and_false_negatives(setup, tmp_path):
    model, ds = setup
    suite = run_suite(model, ds, ["patching", "atp", "atp*", "atp-ig"], progress=False)
    fn = suite.false_negatives()
    assert set(fn.method) == {"atp", "atp*", "atp-ig"} and set(fn.grid) == {"heads", "attn_out", "mlp_out"}
    assert suite.results["heads"]["atp*"].axes == ("layer", "head")
    summary = suite.summary()
    assert "false_negatives" in summary and set(summary["methods"]) >= {"atp*", "atp-ig"}
    written = json.loads((suite.write(tmp_path) / "summary.json").read_text())
    assert written["false_negatives"]["attn_out/atp*/top10"]["missed"] == fn.query("grid == 'attn_out' and method == 'atp*' and k == 10").missed.item()
