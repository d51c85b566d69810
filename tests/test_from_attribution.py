"""Attribution scores as fixed activation scalars with a fitted beta (Sec. 6.1, Fig. 9)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mechsteer.attribution.atp import attribution_patching, attribution_patching_all
from mechsteer.attribution.dla import direct_logit_attribution
from mechsteer.attribution.lrp import attnlrp
from mechsteer.attribution.patching import activation_patching
from mechsteer.attribution.result import stack_sites
from mechsteer.interventions import ActivScalar
from mechsteer.interventions.from_attribution import (
    attribution_scalars,
    compare_with_trained,
    default_betas,
    fit_beta,
    orientation,
    scalars_from_result,
)
from mechsteer.interventions.train import TrainConfig, train
from mechsteer.metrics import logit_diff
from mechsteer.tasks import ccc


@pytest.fixture(scope="module")
def ds(tiny_gpt2):
    return ccc(tiny_gpt2, n=8)


def test_site_grid_layouts(tiny_gpt2, ds):
    model = tiny_gpt2
    r = activation_patching(model, ds, site=["attn_out", "mlp_out"], progress=False)
    assert r.axes == ("site", "layer", "pos")
    iv = scalars_from_result(model, r, normalize=True)  # the option (the default is raw, below)
    assert iv.sites == ("attn_out", "mlp_out") and iv.n_pos == ds.n_pos
    default = scalars_from_result(model, r)  # the paper's (Sec. 6.1): raw scores, oriented
    for i, s in enumerate(default.sites):
        torch.testing.assert_close(default.alpha(s), r.scores[i] * orientation(r))
    scale = r.scores.abs().max() * orientation(r)
    for i, s in enumerate(iv.sites):
        assert iv.alpha(s).shape == (2, ds.n_pos)
        torch.testing.assert_close(iv.alpha(s), r.scores[i] / scale)
    assert max(iv.alpha(s).abs().max().item() for s in iv.sites) == pytest.approx(1.0)
    assert not any(p.requires_grad for p in iv.parameters())
    raw = scalars_from_result(model, r, normalize=False, orient=False, sites=["mlp_out"])
    assert raw.sites == ("mlp_out",) and torch.equal(raw.alpha("mlp_out"), r.scores[1])
    # per-site AtP results: ("layer", "pos") with the site in meta, or stacked
    atp = attribution_patching_all(model, ds, sites=("attn_out", "mlp_out"))
    assert scalars_from_result(model, atp["mlp_out"]).sites == ("mlp_out",)
    assert scalars_from_result(model, stack_sites(list(atp.values()), list(atp))).sites == ("attn_out", "mlp_out")


def test_orientation_makes_positive_raise_the_metric(tiny_gpt2, ds):
    r = attribution_patching(tiny_gpt2, ds, site="mlp_out")
    assert {"clean_metric", "corrupted_metric"} <= set(r.meta)
    up = dataclasses.replace(r, meta={**r.meta, "clean_metric": 1.0, "corrupted_metric": 5.0})  # CCC-like
    raw = scalars_from_result(tiny_gpt2, up, orient=False).alpha("mlp_out")
    torch.testing.assert_close(scalars_from_result(tiny_gpt2, up).alpha("mlp_out"), -raw)
    down = dataclasses.replace(r, meta={**r.meta, "clean_metric": 5.0, "corrupted_metric": 1.0})
    torch.testing.assert_close(scalars_from_result(tiny_gpt2, down).alpha("mlp_out"), raw)
    dla = direct_logit_attribution(tiny_gpt2, ds, site="mlp_out")  # no clean/corrupted: kept
    assert orientation(dla) == 1.0


def test_head_layouts(tiny_gpt2, tiny_llama, ds):
    heads = activation_patching(tiny_gpt2, ds, site="z", per_position=False, progress=False)
    assert heads.axes == ("layer", "head")
    iv = scalars_from_result(tiny_gpt2, heads, n_pos=ds.n_pos, normalize=True)
    a = iv.alpha("z")
    assert iv.sites == ("z",) and a.shape == (2, ds.n_pos, 4)
    assert torch.equal(a, a[:, :1].expand_as(a))  # each head scaled alike at every position
    torch.testing.assert_close(a[:, 0], heads.scores / heads.scores.abs().max() * orientation(heads))
    with pytest.raises(ValueError, match="pass n_pos"):
        scalars_from_result(tiny_gpt2, heads)
    per_pos = attribution_patching(tiny_gpt2, ds, site="z")
    assert per_pos.axes == ("layer", "head", "pos")
    a = scalars_from_result(tiny_gpt2, per_pos, normalize=True).alpha("z")
    torch.testing.assert_close(a, per_pos.scores.permute(0, 2, 1) / per_pos.scores.abs().max() * orientation(per_pos))
    llama_ds = ccc(tiny_llama, n=4)
    dla = direct_logit_attribution(tiny_llama, llama_ds, site="z")  # GQA model: z is per query head
    iv = scalars_from_result(tiny_llama, dla, n_pos=llama_ds.n_pos)
    with iv.apply(tiny_llama, 1.0):
        tiny_llama(llama_ds.tokens)


def test_attnlrp_and_refusals(tiny_gpt2, ds):
    out = attnlrp(tiny_gpt2, ds, progress=False)
    with pytest.raises(ValueError, match="resid_pre"):
        scalars_from_result(tiny_gpt2, out["sites"])  # default sites include resid_pre
    assert scalars_from_result(tiny_gpt2, out["sites"], sites=["attn_out", "mlp_out", "resid_post"]).n_params == 3 * 2 * ds.n_pos
    with pytest.raises(ValueError, match="no ActivScalar layout"):
        scalars_from_result(tiny_gpt2, out["input"])  # ("pos",)
    with pytest.raises(ValueError, match="n_pos=3"):
        scalars_from_result(tiny_gpt2, out["sites"], sites=["mlp_out"], n_pos=3)
    zero = out["sites"].select(site="mlp_out")
    zero.scores = torch.zeros_like(zero.scores)
    with pytest.raises(ValueError, match="every score is 0"):
        scalars_from_result(tiny_gpt2, zero, site="mlp_out")


def test_fit_beta_keeps_alphas_fixed_and_never_loses_to_one(tiny_gpt2, ds):
    iv = scalars_from_result(tiny_gpt2, attribution_patching(tiny_gpt2, ds, site="mlp_out"), normalize=True)
    before = iv.alpha("mlp_out").clone()
    scaled, table = fit_beta(tiny_gpt2, iv, ds, betas=[0.1, 10.0, -10.0], refine_steps=3, batch_size=4, progress=False)
    assert torch.equal(iv.alpha("mlp_out"), before)  # the input is untouched
    assert not any(p.requires_grad for p in scaled.parameters())
    assert table["chosen"].sum() == 1 and set(table["source"]) == {"grid", "adam"}
    assert table["beta"].tolist()[:4] == [-10.0, 0.1, 1.0, 10.0]  # 1 always tried
    best = table[table["chosen"]].iloc[0]
    torch.testing.assert_close(scaled.alpha("mlp_out"), before * best["beta"])
    assert best["effectiveness"] >= table.loc[table["beta"] == 1.0, "effectiveness"].iloc[0]
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(tiny_gpt2, scaled, ds, TrainConfig(epochs=1, progress=False))
    with pytest.raises(ValueError, match="finite"):
        fit_beta(tiny_gpt2, iv, ds, betas=[float("nan")], progress=False)


def test_sign_convention_with_gradient_x_input(tiny_gpt2, ds):
    """Scores = h . grad(f_c - f_w): beta > 0 must raise the mean logit difference."""
    r = attnlrp(tiny_gpt2, ds, readout="sites", sites=["attn_out", "mlp_out"], rules=False, progress=False)
    iv = scalars_from_result(tiny_gpt2, r)
    lds = []
    for beta in (-1e-3, 0.0, 1e-3):
        with iv.apply(tiny_gpt2, beta):
            lds.append(logit_diff(tiny_gpt2(ds.tokens), ds.correct, ds.wrong).item())
    assert lds[0] < lds[1] < lds[2], lds


def test_compare_with_trained(tiny_gpt2, ds):
    train_ds, test_ds = ds.split()
    trained = ActivScalar.for_model(tiny_gpt2, sites=["attn_out", "mlp_out"], n_pos=ds.n_pos)
    train(tiny_gpt2, trained, train_ds, TrainConfig(epochs=2, batch_size=4, lr=0.05, progress=False))
    results = {
        "AtP": attribution_patching(tiny_gpt2, train_ds, site="mlp_out"),
        "DLA": direct_logit_attribution(tiny_gpt2, train_ds, site="z"),
    }
    df = compare_with_trained(tiny_gpt2, results, trained, train_ds, test_ds, betas=[-1.0, 10.0], progress=False)
    assert df["method"].tolist() == ["AtP", "DLA", "ActivScalar (trained)"]
    assert df["beta"].iloc[-1] == 1.0 and set(df["beta"].iloc[:2]) <= {-1.0, 1.0, 10.0}
    cols = [f"{s}_{m}" for s in ("train", "test") for m in ("effectiveness", "faithfulness")]
    assert (df[cols] <= 1e-6).all().all()
    iv = attribution_scalars(tiny_gpt2, results["AtP"], train_ds, betas=[-1.0, 10.0], progress=False)
    assert iv.sites == ("mlp_out",) and iv.n_pos == ds.n_pos
    assert default_betas()[0] == -100.0 and 1.0 in default_betas() and len(default_betas()) == 26


def test_sweep_beta_is_the_default_paper_procedure(tiny_gpt2, ds):
    """Sec. 6.1 / Fig. 9: raw scores, a beta sweep (E_0, F, minimality per beta), best by E_0."""
    from mechsteer.interventions.from_attribution import choose_beta, sweep_beta, sweep_betas

    r = direct_logit_attribution(tiny_gpt2, ds, site="mlp_out")
    iv = scalars_from_result(tiny_gpt2, r)
    torch.testing.assert_close(iv.alpha("mlp_out"), r.scores)  # raw: DLA's logits as alphas
    scaled, table = sweep_beta(tiny_gpt2, iv, ds, batch_size=4, progress=False)
    assert list(table.columns) == ["beta", "effectiveness", "faithfulness", "minimality", "chosen"]
    assert table["beta"].tolist() == sweep_betas() and table["chosen"].sum() == 1
    best = table[table["chosen"]].iloc[0]
    assert best["effectiveness"] == pytest.approx(table["effectiveness"].max(), abs=1e-6)
    torch.testing.assert_close(scaled.alpha("mlp_out"), iv.alpha("mlp_out") * best["beta"])
    for _, row in table.iterrows():  # minimality counts |beta alpha| > 0.01
        assert row["minimality"] == int((iv.alpha("mlp_out").abs() * abs(row["beta"]) > 0.01).sum())
    # the default of attribution_scalars is this sweep on raw scores
    default = attribution_scalars(tiny_gpt2, r, ds, batch_size=4, progress=False)
    torch.testing.assert_close(default.alpha("mlp_out"), scaled.alpha("mlp_out"))
    # a fixed beta: one row, no search
    fixed, one = choose_beta(tiny_gpt2, iv, ds, -2.0, progress=False)
    assert one["beta"].tolist() == [-2.0] and bool(one["chosen"].iloc[0])
    torch.testing.assert_close(fixed.alpha("mlp_out"), -2.0 * iv.alpha("mlp_out"))
    with pytest.raises(ValueError, match="beta must be one of"):
        choose_beta(tiny_gpt2, iv, ds, "tune")


def test_old_behaviour_reachable_normalised_and_fitted(tiny_gpt2, ds):
    """normalize=True, beta="fit": the pre-issue-12 default (normalised scores, fitted beta*)."""
    r = attribution_patching(tiny_gpt2, ds, site="mlp_out")
    kw = dict(betas=[-1.0, 10.0], refine_steps=2, batch_size=4, progress=False)
    old = attribution_scalars(tiny_gpt2, r, ds, normalize=True, beta="fit", **kw)
    want, table = fit_beta(tiny_gpt2, scalars_from_result(tiny_gpt2, r, normalize=True), ds, **kw)
    torch.testing.assert_close(old.alpha("mlp_out"), want.alpha("mlp_out"))
    assert "adam" in set(table["source"]) and "minimality" in table.columns
    train_ds, test_ds = ds.split()
    trained = ActivScalar.for_model(tiny_gpt2, sites=["mlp_out"], n_pos=ds.n_pos)
    df = compare_with_trained(tiny_gpt2, {"AtP": r}, trained, train_ds, test_ds, betas=[-1.0, 10.0], progress=False)
    assert "train_effectiveness_at_1" in df.columns and df["train_effectiveness_at_1"].notna().all()
