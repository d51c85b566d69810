"""ActivScalar (Eq. 5), SteerVec (Eq. 4), DynScalar (Eq. 10) and the objective (Eq. 6-9)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from mechsteer.interventions import ActivScalar, DynScalar, SteerVec, steer
from mechsteer.interventions.objective import (
    clean_last_logits,
    effectiveness,
    faithfulness,
    minimality,
    objective,
    plus_minus_logits,
)
from mechsteer.sites import live_hooks
from mechsteer.tasks import ccc
from mechsteer.tiny import tiny_model

KINDS = [ActivScalar, SteerVec, DynScalar]
SITES = ["attn_out", "mlp_out", "resid_post", "z"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny64(request):
    """Float64 tiny models for finite differences (own copies: .double() is in place).

    The gpt2 one is float64 throughout. The llama one still computes part of its
    forward in float32 (its gradients carry float32 precision), so its check uses a
    larger step and tolerance.
    """
    return request.param, tiny_model(request.param).double()


def _ds(model):
    return ccc(model, n=4)


def _build(cls, model, ds, sites=SITES, std=0.0, **kw):
    iv = cls.for_model(model, sites=sites, n_pos=ds.n_pos, **kw)
    with torch.no_grad():
        for p in iv.parameters():
            p.normal_(0, std) if std else p.zero_()
    return iv


# --- shapes and construction -----------------------------------------------------
def test_param_counts_gpt2_xl_shape():
    shape = dict(n_layers=48, d_model=1600, n_pos=19)
    assert ActivScalar(["attn_out"], **shape).n_params == 912
    assert SteerVec(["attn_out"], **shape).n_params == 1_459_200
    assert DynScalar(["attn_out"], n_layers=48, d_model=1600).n_params == 48 * 1600
    z = dict(n_layers=48, d_model=1600, n_heads=25, d_head=64, n_pos=19)
    assert ActivScalar(["z"], **z).n_params == 48 * 19 * 25
    assert SteerVec(["z"], **z).n_params == 48 * 19 * 1600
    assert ActivScalar(["mlp_out"], [3, 5], "last", n_layers=48, d_model=1600).n_params == 2


def test_init_seeded_gaussian():
    a = SteerVec(["mlp_out"], n_layers=4, d_model=256, n_pos=10, seed=1)
    b = SteerVec(["mlp_out"], n_layers=4, d_model=256, n_pos=10, seed=1)
    c = SteerVec(["mlp_out"], n_layers=4, d_model=256, n_pos=10, seed=2)
    assert torch.equal(a.params["mlp_out"], b.params["mlp_out"])
    assert not torch.equal(a.params["mlp_out"], c.params["mlp_out"])
    assert a.params["mlp_out"].std().item() == pytest.approx(1e-5, rel=0.05)


def test_init_readings_of_app_a1():
    """N(0, 1e-5): "std" (the default, std 1e-5) or "var" (variance 1e-5, std ~3.2e-3)."""
    shape = dict(n_layers=4, d_model=256, n_pos=10, seed=1)
    std, var = SteerVec(["mlp_out"], init_std="std", **shape), SteerVec(["mlp_out"], init_std="var", **shape)
    assert std.init_std == 1e-5 and torch.equal(std.params["mlp_out"], SteerVec(["mlp_out"], **shape).params["mlp_out"])
    assert var.params["mlp_out"].var().item() == pytest.approx(1e-5, rel=0.05)
    with pytest.raises(ValueError, match="init_std='variance'"):
        SteerVec(["mlp_out"], init_std="variance", **shape)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sites=["resid_mid"]), "ln2.hook_in"),
        (dict(sites=["attn_outt"]), "Did you mean"),
        (dict(sites=["q"]), "cannot be intervened"),
        (dict(layers=[7]), "layers"),
        (dict(positions="first"), "positions"),
        (dict(positions=[1, 1]), "distinct"),
        (dict(positions=[40]), "beyond"),
        (dict(n_pos=None), "needs n_pos"),
        (dict(sites=["z"], n_heads=None), "needs n_heads"),
    ],
)
def test_bad_specs(kwargs, match):
    spec = dict(sites=["attn_out"], n_layers=2, d_model=8, n_heads=2, d_head=4, n_pos=5) | kwargs
    with pytest.raises(ValueError, match=match):
        ActivScalar(**spec)


def test_model_shape_mismatch(tiny_gpt2):
    iv = ActivScalar(["attn_out"], n_layers=2, d_model=32, n_pos=5)
    with pytest.raises(ValueError, match="d_model"), iv.apply(tiny_gpt2, 1.0):
        pass
    assert live_hooks(tiny_gpt2) == []


# --- identity --------------------------------------------------------------------
@pytest.mark.parametrize("cls", KINDS)
def test_zero_params_and_beta_zero_are_identity(tiny, cls):
    ds = _ds(tiny)
    clean = tiny(ds.tokens)
    zero = _build(cls, tiny, ds)
    for beta in (1.0, -1.0):
        assert torch.equal(zero(tiny, ds.tokens, beta), clean)
    f = faithfulness(zero(tiny, ds.tokens, 1.0)[:, -1], zero(tiny, ds.tokens, -1.0)[:, -1], clean[:, -1])
    assert f.item() == 0.0
    big = _build(cls, tiny, ds, std=1.0)
    assert torch.equal(big(tiny, ds.tokens, 0.0), clean)
    assert not torch.allclose(big(tiny, ds.tokens, 1.0), clean)
    assert live_hooks(tiny) == []


# --- the equations at the activation level --------------------------------------
@pytest.mark.parametrize("cls", KINDS)
def test_equations_on_resid_post(tiny_gpt2, cls):
    """The residual entering block 1 is h~ of resid_post at layer 0 (Eq. 4, 5, 10)."""
    model, ds = tiny_gpt2, _ds(tiny_gpt2)
    iv = _build(cls, model, ds, sites=["resid_post"], layers=[0], std=0.3)
    _, cache = model.run_with_cache(ds.tokens, names_filter=["blocks.0.hook_resid_post"])
    h = cache["blocks.0.hook_resid_post"]  # (B, T, d)
    beta = torch.tensor([1.0, -1.0, 0.5, 2.0])
    got = {}
    with iv.apply(model, beta), model.hooks([("blocks.1.hook_resid_pre", lambda x, hook: got.setdefault("x", x))]):
        model(ds.tokens)
    p = iv.params["resid_post"][0]
    b = beta.view(-1, 1, 1)
    if cls is ActivScalar:
        want = h * (1 + b * p.unsqueeze(-1))
    elif cls is SteerVec:
        want = h + b * p
    else:
        want = h * (1 + b * (h / h.norm(dim=-1, keepdim=True) @ p).unsqueeze(-1))
    torch.testing.assert_close(got["x"], want)


@pytest.mark.parametrize("cls", KINDS)
@pytest.mark.parametrize("positions", ["last", [2, -3]])
def test_positions_subset(tiny_llama, cls, positions):
    ds = _ds(tiny_llama)
    iv = _build(cls, tiny_llama, ds, positions=positions, std=1.0)
    clean, out = tiny_llama(ds.tokens), iv(tiny_llama, ds.tokens, 1.0)
    first = ds.n_pos - 1 if positions == "last" else 2
    torch.testing.assert_close(out[:, :first], clean[:, :first], rtol=0, atol=0)  # causal: earlier untouched
    assert not torch.allclose(out[:, first], clean[:, first])


# --- one batch for beta = +1 and -1 ----------------------------------------------
@pytest.mark.parametrize("cls", KINDS)
def test_plus_minus_one_batch_equals_two_runs(tiny, cls):
    ds = _ds(tiny)
    iv = _build(cls, tiny, ds, std=0.5)
    plus, minus = plus_minus_logits(tiny, iv, ds.tokens)
    torch.testing.assert_close(plus, iv(tiny, ds.tokens, 1.0)[:, -1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(minus, iv(tiny, ds.tokens, -1.0)[:, -1], rtol=1e-4, atol=1e-5)


def test_bad_beta_shape_and_no_live_hooks(tiny_gpt2):
    ds = _ds(tiny_gpt2)
    iv = _build(ActivScalar, tiny_gpt2, ds, std=0.1)
    with pytest.raises(ValueError, match="one per prompt"):
        iv(tiny_gpt2, ds.tokens, torch.ones(3))
    with pytest.raises(ValueError, match="scalar or"):
        iv(tiny_gpt2, ds.tokens, torch.ones(4, 1))
    assert live_hooks(tiny_gpt2) == []


# --- prompt length ---------------------------------------------------------------
@pytest.mark.parametrize("cls", [ActivScalar, SteerVec])
def test_position_bound_refuse_other_length(tiny, cls):
    ds = _ds(tiny)
    iv = _build(cls, tiny, ds, std=0.1)
    with pytest.raises(ValueError, match=f"built for prompts of {ds.n_pos} tokens, got {ds.n_pos - 2}"):
        with steer(tiny, iv, 1.0):
            tiny(ds.tokens[:, 2:])
    assert live_hooks(tiny) == []


def test_dynscalar_any_length(tiny):
    ds = _ds(tiny)
    iv = DynScalar.for_model(tiny, sites=SITES)
    for toks in (ds.tokens, ds.tokens[:, 3:], ds.tokens[:1, :5]):
        assert iv(tiny, toks, 1.0).shape[:2] == toks.shape
    assert live_hooks(tiny) == []


# --- gradients through the bridge's hooks vs central finite differences -----------
@pytest.mark.parametrize("cls", KINDS)
def test_gradients_match_finite_differences(tiny64, cls):
    kind, model = tiny64
    ds = _ds(model)
    eps, rel = (1e-6, 1e-5) if kind == "gpt2" else (1e-3, 2e-3)
    iv = _build(cls, model, ds, sites=SITES, std=0.1).double()
    clean = clean_last_logits(model, ds.tokens)

    def psi():
        plus, minus = plus_minus_logits(model, iv, ds.tokens)
        return objective(plus, minus, clean, ds.correct, ds.wrong, iv, margin=1.0, lambda_f=1.0, lambda_m=0.1).psi

    iv.zero_grad()
    psi().backward()
    gen = torch.Generator().manual_seed(0)
    for site in SITES:
        p = iv.params[site]
        assert p.grad is not None and p.grad.abs().sum() > 0
        flat, gflat = p.data.view(-1), p.grad.view(-1)
        for k in torch.randint(0, p.numel(), (3,), generator=gen).tolist():
            old = flat[k].item()
            with torch.no_grad():
                flat[k] = old + eps
                up = psi().item()
                flat[k] = old - eps
                down = psi().item()
                flat[k] = old
            fd = (up - down) / (2 * eps)
            assert gflat[k].item() == pytest.approx(fd, rel=rel, abs=1e-8), (site, k)
    assert live_hooks(model) == []


# --- objective on synthetic tensors ----------------------------------------------
def test_effectiveness_by_hand():
    plus = torch.tensor([[1.0, 3.0, 0.0], [5.0, 0.0, 0.0]])
    minus = torch.tensor([[0.0, 0.0, 9.0], [0.0, 4.0, 0.0]])
    c, w = torch.tensor([0, 0]), torch.tensor([1, 1])
    # prompt 0: max(0, 3-1+1) + max(0, 0-0+1) = 4; prompt 1: max(0, 0-5+1) + max(0, 0-4+1) = 0
    assert effectiveness(plus, minus, c, w, margin=1.0).item() == -2.0
    # m = 0: prompt 0 gives 2 + 0
    assert effectiveness(plus, minus, c, w).item() == -1.0
    with pytest.raises(ValueError, match="margin"):
        effectiveness(plus, minus, c, w, margin=-1.0)


def test_faithfulness_by_hand():
    f = torch.randn(3, 7)
    assert faithfulness(f, f, f).item() == 0.0
    p, q = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]])
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert faithfulness(p, p, q).item() == pytest.approx(-2 * kl, rel=1e-6)
    assert faithfulness(torch.randn(4, 9), torch.randn(4, 9), torch.randn(4, 9)).item() <= 0


def test_faithfulness_no_grad_to_clean():
    clean = torch.randn(2, 5, requires_grad=True)
    plus = torch.randn(2, 5, requires_grad=True)
    faithfulness(plus, plus.detach(), clean).backward()
    assert clean.grad is None and plus.grad is not None


def test_minimality_and_psi_by_hand():
    theta = [torch.tensor([1.0, -2.0]), torch.tensor([[0.5]])]
    assert minimality(theta).item() == -3.5
    iv = ActivScalar(["attn_out"], n_layers=2, d_model=8, n_pos=3)
    assert minimality(iv).item() == pytest.approx(-iv.params["attn_out"].abs().sum().item())
    plus = torch.tensor([[1.0, 3.0]])
    minus = torch.tensor([[0.0, 0.0]])
    clean = torch.tensor([[0.0, 1.0]])
    c, w = torch.tensor([0]), torch.tensor([1])
    t = objective(plus, minus, clean, c, w, theta, margin=1.0, lambda_f=10.0, lambda_m=0.1)
    want = effectiveness(plus, minus, c, w, 1.0) + 10 * faithfulness(plus, minus, clean) + 0.1 * -3.5
    assert t.psi.item() == pytest.approx(want.item())
    assert t.effectiveness.item() == -4.0 and t.minimality.item() == -3.5
    assert t.faithfulness.item() < 0


def test_beta_tensor_carries_gradient(tiny64):
    """beta may be a learnable tensor (fitting only beta, e.g. for fixed alphas)."""
    kind, model = tiny64
    if kind != "gpt2":
        pytest.skip("float64 throughout only on gpt2")
    ds = _ds(model)
    iv = _build(ActivScalar, model, ds, sites=["attn_out", "z"], std=0.3).double()
    beta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    loss = lambda b: iv(model, ds.tokens, b)[:, -1, 3].sum()
    loss(beta).backward()
    eps = 1e-6
    fd = (loss(torch.tensor(0.7 + eps, dtype=torch.float64)) - loss(torch.tensor(0.7 - eps, dtype=torch.float64))) / (
        2 * eps
    )
    assert beta.grad.item() == pytest.approx(fd.item(), rel=1e-5)


def test_package_names_are_the_functions():
    """A submodule named like a function would shadow it on the package (``beta_sweep`` did)."""
    import mechsteer.interventions as I

    for name in I.__all__:
        assert not inspect.ismodule(getattr(I, name)), name
