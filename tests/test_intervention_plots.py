"""Interpretation of learned interventions (seed paper 003, Figs. 3-5)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from mechsteer.interventions import ActivScalar, DynScalar, SteerVec
from mechsteer.interventions.plots import (
    SWEEP_COLUMNS,
    alpha_heatmap,
    beta_sweep,
    beta_sweep_figure,
    dynscalar_alphas,
    dynscalar_figure,
    flip_beta,
    steervec_geometry,
    steervec_geometry_figure,
)
from mechsteer.sites import live_hooks
from mechsteer.tasks import ccc


@pytest.fixture(scope="module")
def ds(tiny_gpt2):
    return ccc(tiny_gpt2, n=6)


def _set(iv, std=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in iv.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return iv


# --- Fig. 3: alpha heatmap --------------------------------------------------------
def test_alpha_heatmap_panels_labels_and_scale(tiny_gpt2, ds):
    iv = _set(ActivScalar.for_model(tiny_gpt2, sites=["attn_out", "z"], n_pos=ds.n_pos), std=1.0)
    fig = alpha_heatmap(iv, ds)
    assert [t.name for t in fig.data] == ["attn_out", f"z @ {ds.labels[-1]}"]
    attn, z = fig.data
    assert list(attn.x) == ds.labels and list(attn.y) == ["0", "1"]
    np.testing.assert_allclose(np.asarray(attn.z), iv.alpha("attn_out").detach().numpy(), rtol=1e-6)
    assert list(z.x) == ["0", "1", "2", "3"]  # layer x head at the last position
    np.testing.assert_allclose(np.asarray(z.z), iv.alpha("z")[:, -1].detach().numpy(), rtol=1e-6)
    zmax = max(iv.alpha("attn_out").abs().max().item(), iv.alpha("z")[:, -1].abs().max().item())  # shown values
    assert attn.zmid == 0 and math.isclose(attn.zmax, zmax, rel_tol=1e-6) and attn.zmin == -attn.zmax
    assert len(alpha_heatmap(iv, ds, z_positions="all").data) == 1 + ds.n_pos
    assert [t.name for t in alpha_heatmap(iv, ds, z_positions=[0, -1]).data][1:] == [
        f"z @ {ds.labels[0]}",
        f"z @ {ds.labels[-1]}",
    ]


def test_alpha_heatmap_selected_positions_and_errors(tiny_gpt2, ds):
    iv = ActivScalar.for_model(tiny_gpt2, sites=["mlp_out"], layers=[1], positions=[2, -1], n_pos=ds.n_pos)
    fig = alpha_heatmap(iv, ds.str_tokens[0])
    assert list(fig.data[0].x) == [ds.labels[2], ds.labels[-1]] and list(fig.data[0].y) == ["1"]
    assert list(alpha_heatmap(iv).data[0].x) == ["2", str(ds.n_pos - 1)]
    with pytest.raises(TypeError, match="ActivScalar"):
        alpha_heatmap(SteerVec.for_model(tiny_gpt2, n_pos=ds.n_pos))
    with pytest.raises(ValueError, match="n_pos"):
        alpha_heatmap(iv, ["a", "b"])


# --- Fig. 3: beta sweep -----------------------------------------------------------
def test_beta_sweep_at_zero_is_the_clean_logit_diff(tiny_gpt2, ds):
    iv = _set(ActivScalar.for_model(tiny_gpt2, sites=["attn_out", "mlp_out"], n_pos=ds.n_pos), std=0.5)
    df = beta_sweep(tiny_gpt2, iv, ds, betas=torch.linspace(-2, 2, 5), batch_size=4, progress=False)
    assert list(df.columns) == SWEEP_COLUMNS and df["beta"].tolist() == [-2.0, -1.0, 0.0, 1.0, 2.0]
    clean, _ = ds.logit_diffs(tiny_gpt2)
    row = df.set_index("beta").loc[0.0]
    assert row["logit_diff"] == pytest.approx(clean.mean().item(), abs=1e-5)
    assert row["logit_diff_std"] == pytest.approx(clean.std().item(), abs=1e-5)
    assert row["accuracy"] == pytest.approx((clean > 0).float().mean().item())
    with torch.no_grad():  # batching over (beta, prompt) pairs equals one run per beta
        logits = iv(tiny_gpt2, ds.tokens, 1.0)[:, -1]
    ld = logits.gather(-1, ds.correct[:, None]) - logits.gather(-1, ds.wrong[:, None])
    assert df.set_index("beta").loc[1.0, "logit_diff"] == pytest.approx(ld.mean().item(), abs=1e-5)
    assert live_hooks(tiny_gpt2) == []


def test_flip_beta_and_sweep_figure():
    b = np.linspace(-2, 2, 21)
    df = pd.DataFrame(
        {
            "beta": b,
            "logit_diff": 2 * b - 0.5,
            "logit_diff_std": 0.1,
            "accuracy": (2 * b > 0.5) * 1.0,
            "logit_correct": b,
            "logit_wrong": -b + 0.5,
        }
    )
    assert flip_beta(df) == pytest.approx(0.25)
    assert math.isnan(flip_beta(df.assign(logit_diff=1.0)))
    fig = beta_sweep_figure(df)
    names = [t.name for t in fig.data]
    assert names == ["f_c (correct)", "f_w (wrong)", "+- std", "f_c - f_w", "answer flips"]
    assert fig.data[-1].x[0] == pytest.approx(0.25) and fig.data[-1].y[0] == 0
    assert any(s.y0 == 0 and s.y1 == 0 for s in fig.layout.shapes)  # the zero line
    assert any(s.x0 == pytest.approx(0.25) for s in fig.layout.shapes)  # the flip
    assert "answer flips" not in [t.name for t in beta_sweep_figure(df.assign(logit_diff=1.0)).data]
    with pytest.raises(ValueError, match="beta_sweep"):
        beta_sweep_figure(df.drop(columns="accuracy"))


# --- Fig. 4: SteerVec geometry ----------------------------------------------------
def test_steervec_geometry_zero_vector_is_exactly_zero(tiny_llama):
    ds = ccc(tiny_llama, n=4)
    iv = SteerVec.for_model(tiny_llama, sites=["attn_out", "z"], n_pos=ds.n_pos)
    _set(iv)
    df = steervec_geometry(tiny_llama, iv, ds, progress=False)
    assert len(df) == 2 * ds.n_pos + 2 * ds.n_pos * 4  # (layer, pos) + (layer, pos, head)
    assert (df["norm_change"] == 0).all() and (df["cos_change"] == 0).all()
    assert df.loc[df["site"] == "z", "head"].notna().all() and df.loc[df["site"] == "attn_out", "head"].isna().all()


def test_steervec_geometry_matches_hand_computation(tiny_gpt2, ds):
    iv = SteerVec.for_model(tiny_gpt2, sites=["attn_out"], n_pos=ds.n_pos)
    _set(iv)
    v = torch.randn(tiny_gpt2.cfg.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        iv.params["attn_out"][1, 3] = v
    beta = 0.5
    df = steervec_geometry(tiny_gpt2, iv, ds, beta=beta, batch_size=4, progress=False)
    _, cache = tiny_gpt2.run_with_cache(ds.tokens, names_filter=["blocks.1.hook_attn_out"])
    h = cache["blocks.1.hook_attn_out"][:, 3].double()  # (N, d_model)
    ht = h + beta * v.double()
    norm = (ht.norm(dim=-1) / h.norm(dim=-1) - 1).mean().item()
    cos = (1 - torch.nn.functional.cosine_similarity(h, ht, dim=-1)).mean().item()
    hit = (df["layer"] == 1) & (df["pos"] == 3)
    assert df.loc[hit, "norm_change"].item() == pytest.approx(norm, rel=1e-9)
    assert df.loc[hit, "cos_change"].item() == pytest.approx(cos, rel=1e-6)
    assert (df.loc[~hit, ["norm_change", "cos_change"]] == 0).all().all()
    assert df.loc[hit, "token"].item() == ds.labels[3]


def test_steervec_geometry_figure(tiny_gpt2, ds):
    iv = _set(SteerVec.for_model(tiny_gpt2, sites=["attn_out", "z"], n_pos=ds.n_pos), std=0.1)
    df = steervec_geometry(tiny_gpt2, iv, ds, progress=False)
    fig = steervec_geometry_figure(df)
    assert len(fig.data) == 4 and [t.showscale for t in fig.data] == [False, True, False, True]
    assert list(fig.data[0].x) == ds.labels and np.asarray(fig.data[1].z).shape == (2, ds.n_pos)
    z_mean = df[df["site"] == "z"].groupby(["layer", "pos"])["norm_change"].mean().unstack().to_numpy()
    np.testing.assert_allclose(np.asarray(fig.data[1].z), z_mean)
    with pytest.raises(TypeError, match="SteerVec"):
        steervec_geometry(tiny_gpt2, ActivScalar.for_model(tiny_gpt2, n_pos=ds.n_pos), ds)


# --- Fig. 5: DynScalar alphas -----------------------------------------------------
def test_dynscalar_alphas_equal_the_probe_by_hand(tiny_llama):
    iv = _set(DynScalar.for_model(tiny_llama, sites=["mlp_out", "z"]), std=1.0)
    prompts = ["The capital of France is", "When Anne met with Tom, Tom gave the book to"]
    frames = dynscalar_alphas(tiny_llama, iv, prompts, progress=False)
    assert len(frames) == 2
    for k, (prompt, df) in enumerate(zip(prompts, frames)):
        tokens = tiny_llama.to_tokens(prompt)
        _, cache = tiny_llama.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_mlp_out", "hook_z")))
        assert (df["prompt"] == k).all() and df["pos"].nunique() == tokens.shape[1]
        for layer in range(2):
            h = cache[f"blocks.{layer}.hook_mlp_out"][0]  # (T, d_model)
            want = (h / h.norm(dim=-1, keepdim=True)) @ iv.params["mlp_out"][layer].detach()
            got = df[(df["site"] == "mlp_out") & (df["layer"] == layer)].sort_values("pos")["alpha"]
            np.testing.assert_allclose(got.to_numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
            z = cache[f"blocks.{layer}.attn.hook_z"][0]  # (T, H, d_head)
            want = ((z / z.norm(dim=-1, keepdim=True)) * iv.params["z"][layer].detach()).sum(-1)  # (T, H)
            got = df[(df["site"] == "z") & (df["layer"] == layer)].sort_values(["pos", "head"])["alpha"]
            np.testing.assert_allclose(got.to_numpy(), want.reshape(-1).numpy(), rtol=1e-5, atol=1e-6)


def test_dynscalar_figure_one_row_per_site_one_column_per_prompt(tiny_gpt2):
    iv = _set(DynScalar.for_model(tiny_gpt2, sites=["attn_out", "mlp_out"]), std=1.0)
    prompts = ["The capital of France is", "Paris"]
    frames = dynscalar_alphas(tiny_gpt2, iv, prompts, progress=False)
    fig = dynscalar_figure(frames, titles=prompts)
    assert len(fig.data) == 4
    lengths = [tiny_gpt2.to_tokens(p).shape[1] for p in prompts]
    assert [len(t.x) for t in fig.data] == lengths * 2
    assert fig.data[0].x[1] == "1:The" and all(t.zmid == 0 for t in fig.data)
    assert len({t.zmax for t in fig.data}) == 1  # one shared scale
    with pytest.raises(TypeError, match="DynScalar"):
        dynscalar_alphas(tiny_gpt2, SteerVec.for_model(tiny_gpt2, n_pos=3), prompts)
    with pytest.raises(ValueError, match="titles"):
        dynscalar_figure(frames, titles=["one"])
