"""Bad input never passes silently: the attribution, intervention and function-vector methods.

One test per case from the issue; each would have passed silently (NaN scores, a count of
``True``, an empty result) or failed deep inside torch before the checks. A "NaN model" is
a fresh tiny model with one MLP weight set to NaN, so every logit is NaN. The tests run
with jaxtyping's runtime checks off, as users run mechsteer, so that the error seen is
mechsteer's own.
"""

from __future__ import annotations

import dataclasses

import jaxtyping
import pytest
import torch

from mechsteer.attribution.atp import attribution_patching, attribution_patching_all
from mechsteer.attribution.compare import compare, top_k_set
from mechsteer.attribution.dla import (
    DLARun,
    _check_sum,
    direct_logit_attribution,
    direct_logit_attribution_all,
    dla_terms,
)
from mechsteer.attribution.lrp import attnlrp
from mechsteer.attribution.patching import activation_patching
from mechsteer.attribution.result import AttributionResult
from mechsteer.attribution.suite import run_suite
from mechsteer.fv.means import mean_head_z
from mechsteer.fv.pipeline import FVConfig
from mechsteer.fv.scores import atp_head_scores, lrp_head_scores, rank_correlation
from mechsteer.interventions import ActivScalar, SteerVec
from mechsteer.interventions.evaluate import evaluate
from mechsteer.interventions.from_attribution import fit_beta, scalars_from_result
from mechsteer.interventions.objective import effectiveness, objective
from mechsteer.interventions.train import TrainConfig, train
from mechsteer.sites import live_hooks
from mechsteer.tasks import ioi
from mechsteer.tasks.fv import FVPrompts
from mechsteer.tiny import tiny_model

NAN = float("nan")


@pytest.fixture(autouse=True)
def production():
    """jaxtyping's checks off (users run without the test suite's import hook)."""
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", before)


def _nan_model(family: str, layer: int = 1):
    model = tiny_model(family)
    tag = f".{layer}."
    name, weight = [(n, p) for n, p in model.named_parameters() if tag in n and "mlp" in n and p.ndim == 2][-1]
    with torch.no_grad():
        weight[0, 0] = NAN  # the MLP's output projection of block ``layer``
    return model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def nan_model(request):
    model = _nan_model(request.param)
    ds = ioi(model, n=4)
    with torch.no_grad():
        assert model(ds.tokens)[:, -1].isnan().all()  # the premise: every logit is NaN
    return model, ds


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_model("gpt2")
    return model, ioi(model, n=4)


def _fv_prompts(model, corrupted=False):
    toks = [model.to_tokens("Opposite: hot ->")[0]]
    top = model(toks[0][None])[0, -1].argmax()[None]  # the model's own top token
    return FVPrompts("antonym", "instruction/corrupted" if corrupted else "instruction", ["Opposite: hot ->"],
                     toks, top, [[1, 2]], [0], ["hot"], ["cold"])


# --- 1. NaN passes silently ---------------------------------------------------------


def test_nan_model_activation_patching_raises(nan_model):
    model, ds = nan_model
    with pytest.raises(FloatingPointError, match="NaN"):
        activation_patching(model, ds, site="z", per_position=False, progress=False)
    assert live_hooks(model) == []


def test_nan_model_activation_patching_custom_metric_names_the_metric(nan_model):
    model, ds = nan_model
    with pytest.raises(FloatingPointError, match="activation_patching: metric on the clean prompts"):
        activation_patching(model, ds, site="attn_out", metric=lambda lg, d: lg[:, -1, 0].mean(), progress=False)


def test_nan_model_attribution_patching_raises(nan_model):
    model, ds = nan_model
    with pytest.raises(FloatingPointError, match="NaN"):
        attribution_patching(model, ds, site="attn_out")
    with pytest.raises(FloatingPointError, match="NaN"):
        attribution_patching_all(model, ds, sites=["z", "mlp_out"], direction="denoising")
    with pytest.raises(FloatingPointError, match="attribution_patching: metric on the clean prompts"):
        attribution_patching(model, ds, metric=lambda lg, d: lg[:, -1, 0].mean())
    assert live_hooks(model) == []


def test_nan_model_dla_raises(nan_model):
    model, ds = nan_model
    with pytest.raises(FloatingPointError, match="DLA: the model's last-position logits"):
        direct_logit_attribution(model, ds, site="z")
    with pytest.raises(FloatingPointError, match="DLA"):
        direct_logit_attribution_all(model, ds)
    with pytest.raises(FloatingPointError, match="DLA"):
        dla_terms(model, ds)


def test_dla_sum_check_fails_on_nan_terms():
    """``NaN > tol`` is False: the check must fail when the terms add up to NaN."""
    B, L, H, e = 2, 2, 3, 4
    zeros = torch.zeros(B, L)
    run = DLARun(z=torch.zeros(B, L, H, e), head_readout=torch.zeros(B, L, H, e), mlp=zeros.clone(),
                 attn_bias=zeros, embed=torch.zeros(B), pos_embed=None, unembed_bias=torch.zeros(B),
                 metric=torch.zeros(B), post_norm=False)
    run.mlp[0, 1] = NAN
    with pytest.raises(ValueError, match="do not add up"):
        _check_sum(run, torch.zeros(B, L, H), torch.float32)


def test_nan_model_attnlrp_raises(nan_model):
    model, ds = nan_model
    with pytest.raises(FloatingPointError, match="attnlrp"):
        attnlrp(model, ds, progress=False)
    with pytest.raises(FloatingPointError, match="attnlrp"):
        attnlrp(model, ds.tokens, answer=ds.correct, readout="input", progress=False)
    assert live_hooks(model) == []


def test_nan_model_fv_scores_raise():
    model = _nan_model("gpt2", layer=0)  # block 0's MLP: the heads of block 1 read NaN
    with pytest.raises(FloatingPointError, match="mean_head_z"):
        mean_head_z(model, _fv_prompts(tiny_model("gpt2")), progress=False)
    corr = _fv_prompts(tiny_model("gpt2"), corrupted=True)
    with pytest.raises(FloatingPointError, match="atp_head_scores"):
        atp_head_scores(model, corr, torch.zeros(2, 4, 16), progress=False)


def test_nan_mean_z_raises(gpt2):
    model, _ = gpt2
    mz = torch.zeros(2, 4, 16)
    mz[1, 2, 3] = NAN
    with pytest.raises(FloatingPointError, match="mean_z"):
        atp_head_scores(model, _fv_prompts(model, corrupted=True), mz, progress=False)


def test_nan_scores_refused_by_compare_and_conversions(gpt2):
    model, ds = gpt2
    good = AttributionResult(torch.rand(2, ds.n_pos), ("layer", "pos"), "a", meta={"site": "mlp_out"})
    bad = dataclasses.replace(good, scores=good.scores.clone(), method="b")
    bad.scores[0, 1] = NAN
    with pytest.raises(FloatingPointError, match="'b'"):
        compare([good, bad])
    with pytest.raises(FloatingPointError, match="rank_correlation"):
        rank_correlation(good.scores, bad.scores)
    with pytest.raises(FloatingPointError, match="scalars_from_result"):
        scalars_from_result(model, bad, normalize=False)


@pytest.mark.parametrize("beta", [NAN, float("inf"), -float("inf")])
def test_non_finite_beta_is_refused_by_apply(gpt2, beta):
    model, ds = gpt2
    iv = ActivScalar.for_model(model, sites=["attn_out"], n_pos=ds.n_pos)
    with pytest.raises(ValueError, match="beta"), iv.apply(model, beta):
        pass
    with pytest.raises(ValueError, match="beta"):
        iv(model, ds.tokens, torch.tensor([1.0, beta, 1.0, 1.0]))
    assert live_hooks(model) == []


def test_non_finite_beta_is_refused_by_fit_beta(gpt2):
    model, ds = gpt2
    iv = ActivScalar.for_model(model, sites=["mlp_out"], n_pos=ds.n_pos)
    with pytest.raises(ValueError, match="betas"):
        fit_beta(model, iv, ds, betas=[0.5, float("inf")], progress=False)
    with pytest.raises(ValueError, match="betas"):
        fit_beta(model, iv, ds, betas=[NAN], progress=False)


def test_nan_model_train_and_evaluate_raise():
    model = _nan_model("gpt2")
    ds = ioi(tiny_model("gpt2"), n=4)
    iv = ActivScalar.for_model(model, sites=["attn_out"], n_pos=ds.n_pos)
    with pytest.raises(FloatingPointError, match="clean last-position logits"):
        train(model, iv, ds, TrainConfig(epochs=1, batch_size=2, progress=False))
    with pytest.raises(FloatingPointError, match="evaluate"):
        evaluate(model, iv, ds)
    with pytest.raises(FloatingPointError, match="fit_beta"):
        fit_beta(model, iv, ds, betas=[1.0], progress=False)


def test_nan_intervention_parameters_are_refused_by_evaluate(gpt2):
    model, ds = gpt2
    iv = SteerVec.for_model(model, sites=["mlp_out"], n_pos=ds.n_pos)
    with torch.no_grad():
        iv.params["mlp_out"][0, 0, 0] = NAN
    with pytest.raises(FloatingPointError, match="parameters at site 'mlp_out'"):
        evaluate(model, iv, ds)


def test_nan_margin_and_lambdas_are_refused():
    f = torch.zeros(1, 3)
    ids = torch.tensor([0]), torch.tensor([1])
    with pytest.raises(ValueError, match="margin"):
        effectiveness(f, f, *ids, margin=NAN)
    with pytest.raises(ValueError, match="lambda_f"):
        objective(f, f, f, *ids, [torch.ones(1)], lambda_f=NAN)
    with pytest.raises(ValueError, match="lambda_m"):
        TrainConfig(lambda_m=float("inf"))


# --- 2. Counts ------------------------------------------------------------------------

COUNT_CASES = {
    "train epochs=True": (lambda m, ds: TrainConfig(epochs=True), TypeError, "epochs"),
    "train batch_size=2.5": (lambda m, ds: TrainConfig(batch_size=2.5), TypeError, "batch_size"),
    "train epochs=0": (lambda m, ds: TrainConfig(epochs=0), ValueError, "epochs"),
    "patching batch_size=0": (
        lambda m, ds: activation_patching(m, ds, batch_size=0, progress=False), ValueError, "batch_size"),
    "patching batch_size=True": (
        lambda m, ds: activation_patching(m, ds, batch_size=True, progress=False), TypeError, "batch_size"),
    "attnlrp batch_size=True": (lambda m, ds: attnlrp(m, ds, batch_size=True, progress=False), TypeError, "batch_size"),
    "attnlrp query_pos=True": (lambda m, ds: attnlrp(m, ds, query_pos=True, progress=False), ValueError, "query_pos"),
    "suite k=0": (lambda m, ds: run_suite(m, ds, ["dla", "atp"], k=0, progress=False), ValueError, "k must"),
    "compare k=True": (
        lambda m, ds: compare([AttributionResult(torch.ones(2), ("pos",), "a"),
                               AttributionResult(torch.ones(2), ("pos",), "b")], k=True), TypeError, "k must"),
    "top_k_set k=-1": (
        lambda m, ds: top_k_set(AttributionResult(torch.ones(2), ("pos",), "a"), -1), ValueError, "k must"),
    "evaluate batch_size=True": (
        lambda m, ds: evaluate(m, ActivScalar.for_model(m, n_pos=ds.n_pos), ds, batch_size=True),
        TypeError, "batch_size"),
    "fit_beta refine_steps=-1": (
        lambda m, ds: fit_beta(m, ActivScalar.for_model(m, n_pos=ds.n_pos), ds, refine_steps=-1, progress=False),
        ValueError, "refine_steps"),
    "fit_beta batch_size=0": (
        lambda m, ds: fit_beta(m, ActivScalar.for_model(m, n_pos=ds.n_pos), ds, batch_size=0, progress=False),
        ValueError, "batch_size"),
    "ActivScalar n_pos=True": (lambda m, ds: ActivScalar.for_model(m, n_pos=True), TypeError, "n_pos"),
    "ActivScalar n_layers=0": (lambda m, ds: ActivScalar(n_layers=0, d_model=4, n_pos=3), ValueError, "n_layers"),
    "ActivScalar layers=[True]": (
        lambda m, ds: ActivScalar.for_model(m, layers=[True], n_pos=ds.n_pos), TypeError, "layers"),
    "ActivScalar positions=[1.5]": (
        lambda m, ds: ActivScalar.for_model(m, positions=[1.5], n_pos=ds.n_pos), TypeError, "positions"),
    "mean_head_z batch_size=0": (lambda m, ds: mean_head_z(m, _fv_prompts(m), batch_size=0), ValueError, "batch_size"),
    "lrp_head_scores max_rank=True": (
        lambda m, ds: lrp_head_scores(m, _fv_prompts(m), max_rank=True, progress=False), TypeError, "max_rank"),
    "atp_head_scores batch_size=True": (
        lambda m, ds: atp_head_scores(m, _fv_prompts(m, True), torch.zeros(2, 4, 16), batch_size=True),
        TypeError, "batch_size"),
    "FVConfig k=True": (lambda m, ds: FVConfig(k=True), TypeError, "k must"),
    "FVConfig n_cie=0.5": (lambda m, ds: FVConfig(n_cie=0.5), TypeError, "n_cie"),
    "FVConfig lrp_max_rank=0": (lambda m, ds: FVConfig(lrp_max_rank=0), ValueError, "lrp_max_rank"),
}


@pytest.mark.parametrize("case", list(COUNT_CASES))
def test_counts_are_positive_integers(gpt2, case):
    call, error, match = COUNT_CASES[case]
    model, ds = gpt2
    with pytest.raises(error, match=match):
        call(model, ds)
    assert live_hooks(model) == []


def test_float_counts_that_are_whole_numbers_become_ints():
    cfg = TrainConfig(epochs=2.0, batch_size=4)
    assert (cfg.epochs, type(cfg.epochs)) == (2, int)


# --- 3. Deep errors -------------------------------------------------------------------

SITE_CASES = {
    "activation_patching site=[]": (lambda m, ds: activation_patching(m, ds, site=[], progress=False), "site is empty"),
    "attribution_patching_all sites=[]": (lambda m, ds: attribution_patching_all(m, ds, sites=[]), "sites is empty"),
    "direct_logit_attribution_all sites=[]": (
        lambda m, ds: direct_logit_attribution_all(m, ds, sites=[]), "sites is empty"),
    "attnlrp sites=[]": (lambda m, ds: attnlrp(m, ds, sites=[], progress=False), "sites is empty"),
    "activation_patching site twice": (
        lambda m, ds: activation_patching(m, ds, site=["mlp_out", "mlp_out"], progress=False), "twice"),
}


@pytest.mark.parametrize("case", list(SITE_CASES))
def test_empty_site_list_is_a_value_error_listing_the_sites(gpt2, case):
    call, match = SITE_CASES[case]
    model, ds = gpt2
    with pytest.raises(ValueError, match=match) as err:
        call(model, ds)
    assert "mlp_out" in str(err.value)  # the valid sites are listed
    assert live_hooks(model) == []


def test_one_site_methods_refuse_a_list(gpt2):
    model, ds = gpt2
    with pytest.raises(TypeError, match="attribution_patching_all"):
        attribution_patching(model, ds, site=["z"])
    with pytest.raises(TypeError, match="direct_logit_attribution_all"):
        direct_logit_attribution(model, ds, site=[])


ID_CASES = {
    "activation_patching": lambda m, ds: activation_patching(m, ds, progress=False),
    "attribution_patching": lambda m, ds: attribution_patching(m, ds),
    "direct_logit_attribution": lambda m, ds: direct_logit_attribution(m, ds),
    "dla_terms": lambda m, ds: dla_terms(m, ds),
    "attnlrp": lambda m, ds: attnlrp(m, ds, progress=False),
    "train": lambda m, ds: train(m, ActivScalar.for_model(m, n_pos=ds.n_pos), ds, TrainConfig(epochs=1, progress=False)),
    "evaluate": lambda m, ds: evaluate(m, ActivScalar.for_model(m, n_pos=ds.n_pos), ds),
}


@pytest.mark.parametrize("field", ["correct", "wrong", "tokens"])
@pytest.mark.parametrize("method", list(ID_CASES))
def test_ids_beyond_the_vocabulary_are_a_value_error(gpt2, method, field):
    model, ds = gpt2
    ids = getattr(ds, field).clone()
    ids.view(-1)[1] = model.cfg.d_vocab  # one id past the end
    bad = dataclasses.replace(ds, **{field: ids})
    with pytest.raises(ValueError, match=field):
        ID_CASES[method](model, bad)
    assert live_hooks(model) == []
