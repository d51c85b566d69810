"""Refit stability (seed paper 003, Fig. 4): Kendall tau of per-location effects and cosine
distance of parameters across seeds."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import kendalltau

from mechsteer.interventions import ActivScalar, SteerVec
from mechsteer.interventions.stability import location_effects, refit_stability
from mechsteer.interventions.train import TrainConfig
from mechsteer.tasks import ccc

FAST = TrainConfig(epochs=2, batch_size=4, lr=1e-2, progress=False)


@pytest.fixture(scope="module")
def ds(tiny_gpt2):
    return ccc(tiny_gpt2, n=4)


def test_steervec_refits_pairs_and_stats(tiny_gpt2, ds):
    st = refit_stability(tiny_gpt2, ds, "steer_vec", ["mlp_out"], seeds=[0, 1, 2], config=FAST, progress=False)
    assert st.pairs[["seed_a", "seed_b"]].values.tolist() == [[0, 1], [0, 2], [1, 2]]
    assert list(st.effects.columns) == [0, 1, 2] and len(st.effects) == 2 * ds.n_pos  # (layer, pos) of mlp_out
    for _, r in st.pairs.iterrows():
        tau, _ = kendalltau(st.effects[r["seed_a"]], st.effects[r["seed_b"]])
        assert r["kendall_tau"] == pytest.approx(tau)
        assert 0 <= r["cos_distance"] <= 2 and 0 <= r["cos_distance_loc"] <= 2
    # different seeds, different inits: the runs differ
    assert not torch.equal(st.interventions[0].params["mlp_out"], st.interventions[1].params["mlp_out"])
    s = st.summary()
    assert s["kendall_tau_mean"] == pytest.approx(st.pairs["kendall_tau"].mean())
    assert set(st.runs.columns) == {"seed", "effectiveness", "faithfulness", "minimality"}


def test_identical_runs_have_tau_one_and_distance_zero(tiny_gpt2, ds):
    from mechsteer.interventions.stability import _cos_distance

    iv = SteerVec.for_model(tiny_gpt2, sites=["mlp_out"], n_pos=ds.n_pos, init_std=0.1)
    e = location_effects(tiny_gpt2, iv, ds)
    assert kendalltau(e, location_effects(tiny_gpt2, iv, ds))[0] == pytest.approx(1.0)
    v = iv.params["mlp_out"].detach()
    assert _cos_distance(v.flatten(), v.flatten()).item() == pytest.approx(0.0, abs=1e-12)
    assert _cos_distance(v.flatten(), -v.flatten()).item() == pytest.approx(2.0)


def test_activscalar_effects_are_alphas_and_refusals(tiny_llama):
    ds = ccc(tiny_llama, n=4)
    iv = ActivScalar.for_model(tiny_llama, sites=["z"], n_pos=ds.n_pos, init_std=0.1)
    e = location_effects(tiny_llama, iv, ds)
    assert torch.allclose(torch.tensor(e.to_numpy()), iv.alpha("z").detach().flatten().double())
    st = refit_stability(tiny_llama, ds, "activ_scalar", ["attn_out"], seeds=[3, 4], config=FAST, progress=False)
    assert len(st.pairs) == 1 and "cos_distance_loc" not in st.pairs
    with pytest.raises(ValueError, match="steer_vec"):
        refit_stability(tiny_llama, ds, "dyn_scalar", seeds=[0, 1])
    with pytest.raises(ValueError, match="two distinct seeds"):
        refit_stability(tiny_llama, ds, "steer_vec", seeds=[1, 1])
