"""Half precision: every attribution method on bf16 / fp16 models, accumulating in float32.

Unit tests run the tiny families in bf16 and fp16; the ``integration`` tests compare
per-head scores of SmolLM2 in bf16 with float32 (8 IOI prompts) and train an ActivScalar
in bf16. Speed is measured in ``benchmarks/bench_half.py``, not here.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import mechsteer
from mechsteer import runs
from mechsteer.attribution import (
    activation_patching,
    attnlrp,
    attribution_patching_all,
    direct_logit_attribution,
    dla_terms,
)
from mechsteer.attribution import _atp_core as core
from mechsteer.attribution.atp_ig import atp_ig_all
from mechsteer.attribution.atp_star import atp_star_all
from mechsteer.attribution.compare import spearman
from mechsteer.attribution.dla import sum_tolerance
from mechsteer.metrics import logit_diff
from mechsteer.tasks import ccc, ioi
from mechsteer.tiny import tiny_model

HALF = [torch.bfloat16, torch.float16]

HEADS = {  # per-head scores of each method
    "patching": lambda m, ds: activation_patching(m, ds, site="z", per_position=False, progress=False),
    "atp": lambda m, ds: attribution_patching_all(m, ds, sites=("z",), head_totals=True)["z"],
    "atp*": lambda m, ds: atp_star_all(m, ds, sites=("z",), head_totals=True)["z"],
    "atp-ig": lambda m, ds: atp_ig_all(m, ds, sites=("z",), head_totals=True)["z"],
    "dla": lambda m, ds: direct_logit_attribution(m, ds, site="z"),
    "attnlrp": lambda m, ds: attnlrp(m, ds, readout="heads", progress=False),
}


def _half(kind: str, dtype: torch.dtype):
    model = tiny_model(kind)
    return model.to(dtype)


@pytest.fixture(scope="module", params=[(k, d) for k in ("gpt2", "llama") for d in HALF], ids=str)
def half_tiny(request):
    kind, dtype = request.param
    return _half(kind, dtype), dtype


def test_float32_logits_only_inside_and_only_the_unembedding():
    model = _half("llama", torch.bfloat16)
    tokens = model.to_tokens("When Mary and John went")
    head = model.unembed.original_component
    seen = []
    handle = head.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            plain = model(tokens)
            with runs.float32_logits(model):
                wide = model(tokens)
            after = model(tokens)
    finally:
        handle.remove()
    assert plain.dtype == after.dtype == torch.bfloat16 and wide.dtype == torch.float32
    assert torch.equal(plain, after) and seen[0].dtype == torch.bfloat16
    expected = torch.nn.functional.linear(seen[1].float(), head.weight.float(),
                                          None if head.bias is None else head.bias.float())
    torch.testing.assert_close(wide, expected, rtol=1e-5, atol=1e-5)
    assert (wide - plain.float()).abs().max() > 0  # bf16 rounded these logits
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_float32_logits_leaves_float32_models_alone(tiny_llama):
    tokens = tiny_llama.to_tokens("Hello")
    with torch.no_grad(), runs.float32_logits(tiny_llama):
        inside = tiny_llama(tokens)
    torch.testing.assert_close(inside, tiny_llama(tokens).detach(), rtol=0, atol=0)


def test_atp_dot_accumulates_in_float32():
    g = torch.full((1, 1, 512), 1.0, dtype=torch.bfloat16)
    a = torch.full((1, 1, 512), 1.0, dtype=torch.bfloat16)
    b = torch.full((1, 1, 512), 1.0 + 2**-7, dtype=torch.bfloat16)  # one bf16 ulp above 1
    out = core.dot(g, b, a)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(512 * 2**-7)


@pytest.mark.parametrize("method", list(HEADS))
def test_every_method_runs_in_half_precision(half_tiny, method):
    model, dtype = half_tiny
    ds = ioi(model, n=4)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*changed the logits")  # no fast path may fall back
        r = HEADS[method](model, ds)
    assert r.scores.dtype == torch.float32 and bool(r.scores.isfinite().all()), r.scores
    assert r.scores.abs().sum() > 0
    assert all(p.dtype == dtype for p in model.parameters())  # parameters keep the model's dtype
    if method == "patching":
        assert r.meta["skipped_lower_blocks"] and r.meta["reused_prefix"]


def test_half_precision_tracks_float32_on_tiny_models(tiny_llama):
    """The tiny llama in bf16 ranks heads as in float32 (per method, 4 IOI prompts)."""
    model = _half("llama", torch.bfloat16)
    ds32, ds16 = ioi(tiny_llama, n=4), ioi(model, n=4)
    for name, fn in HEADS.items():
        a, b = fn(tiny_llama, ds32).scores.flatten(), fn(model, ds16).scores.flatten()
        assert spearman(a, b) >= 0.8, name


def test_dla_tolerance_is_two_unit_roundoffs_per_term():
    terms = torch.tensor([[1.0, -2.0, 3.0]])
    metric = torch.tensor([2.0])
    assert sum_tolerance(terms, metric, torch.bfloat16).item() == pytest.approx(2 * 2**-8 * 6)
    assert sum_tolerance(terms, metric, torch.float16).item() == pytest.approx(2 * 2**-11 * 6)
    assert sum_tolerance(terms, metric, torch.float32).item() == pytest.approx(2e-3)


# ---- SmolLM2 in bf16 against float32 ---------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_bf16():
    return mechsteer.load_model(dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def head_scores(smollm2, smollm2_bf16):
    """Per-head scores of patching, AtP, DLA and AttnLRP on 8 IOI prompts, in both dtypes."""
    out = {}
    for dtype, model in ((torch.float32, smollm2), (torch.bfloat16, smollm2_bf16)):
        ds = ioi(model, n=8)
        for name in ("patching", "atp", "dla", "attnlrp"):
            out[name, dtype] = HEADS[name](model, ds).scores.flatten()
    return out


def _jaccard(a, b, k=20):
    ta, tb = set(a.abs().topk(k).indices.tolist()), set(b.abs().topk(k).indices.tolist())
    return len(ta & tb) / len(ta | tb)


@pytest.mark.integration
@pytest.mark.parametrize("method", ["patching", "atp", "dla", "attnlrp"])
def test_smollm2_bf16_head_scores_agree_with_float32(head_scores, method):
    """Spearman >= 0.9, or where near-zero scores make ranks noise (activation patching:
    each patched run rounds its residual stream differently, about 0.003 in score units,
    above the median head's |score|), the top-20 heads by |score| at Jaccard >= 0.8 and
    Spearman >= 0.9 over the heads above that noise (|score| > 0.01)."""
    a, b = head_scores[method, torch.float32], head_scores[method, torch.bfloat16]
    assert bool(b.isfinite().all())
    if method == "patching":
        big = a.abs() > 0.01
        assert _jaccard(a, b) >= 0.8 and spearman(a[big], b[big]) >= 0.9, (spearman(a, b), _jaccard(a, b))
    else:
        assert spearman(a, b) >= 0.9, spearman(a, b)


@pytest.mark.integration
def test_smollm2_bf16_dla_terms_sum_to_the_logit_difference(smollm2_bf16):
    """bf16 keeps 8 significant bits: unit roundoff u = 2^-8. Each direct term is rounded
    once when its component computes it and once when the residual stream adds it, so the
    terms of a prompt may miss its (float32-read) logit difference by 2 u sum_c |term_c|."""
    model = smollm2_bf16
    ds = ioi(model, n=8)
    df = dla_terms(model, ds)
    total = torch.tensor(df.groupby("prompt")["value"].sum().values)
    size = torch.tensor(df.assign(a=df["value"].abs()).groupby("prompt")["a"].sum().values)
    with torch.no_grad(), runs.float32_logits(model):
        actual = logit_diff(model(ds.tokens), ds.correct, ds.wrong, reduce="none").double()
    tol = 2 * 2**-8 * size
    assert bool(((total - actual).abs() <= tol).all()), ((total - actual).abs(), tol)
    assert float(tol.max()) < 0.5  # a tolerance that still means something (logits)


@pytest.mark.integration
def test_smollm2_bf16_trained_activ_scalar_steers_with_the_sign_of_beta(smollm2_bf16):
    """As ``test_integration``'s float32 check: after training in bf16, beta = +1 makes the
    correct capital win and beta = -1 the in-context one."""
    from mechsteer.interventions import ActivScalar
    from mechsteer.interventions.train import TrainConfig, train

    model = smollm2_bf16
    ds = ccc(model, n=8)
    iv = ActivScalar.for_model(model, sites=["attn_out", "mlp_out"], n_pos=ds.n_pos)
    train(model, iv, ds, TrainConfig(epochs=8, batch_size=8, lr=1e-2, progress=False))
    diffs = {}
    with torch.no_grad(), runs.float32_logits(model):
        for beta in (1.0, -1.0):
            with iv.apply(model, beta):
                diffs[beta] = logit_diff(model(ds.tokens), ds.correct, ds.wrong, reduce="none")
    assert bool(torch.isfinite(diffs[1.0]).all() and torch.isfinite(diffs[-1.0]).all())
    assert (diffs[1.0] > 0).float().mean() >= 0.75, diffs[1.0]
    assert (diffs[-1.0] < 0).all(), diffs[-1.0]
