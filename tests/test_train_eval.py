"""Training (Eq. 9, App. A.1) and evaluation (Sec. 3.4) of learnable interventions."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from mechsteer.interventions import ActivScalar, DynScalar, SteerVec
from mechsteer.interventions.objective import effectiveness
from mechsteer.interventions.evaluate import evaluate, evaluate_splits
from mechsteer.interventions.train import HISTORY_COLUMNS, TrainConfig, train
from mechsteer.sites import live_hooks
from mechsteer.tasks import ccc, ioi


@pytest.fixture(scope="module")
def ds_gpt2(tiny_gpt2):
    return ccc(tiny_gpt2, n=8)


def test_config_defaults_and_lr():
    cfg = TrainConfig()
    assert (cfg.epochs, cfg.batch_size, cfg.lr) == (25, 32, None)
    kw = {"n_layers": 2, "d_model": 8, "n_pos": 3}
    assert cfg.learning_rate(ActivScalar(**kw)) == 1e-3
    assert cfg.learning_rate(DynScalar(**kw)) == 1e-3
    assert cfg.learning_rate(SteerVec(**kw)) == 1e-4
    assert TrainConfig(lr=0.5).learning_rate(SteerVec(**kw)) == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3
    for bad in [{"lr": float("nan")}, {"epochs": 0}, {"margin": -1.0}, {"batch_size": 0}]:
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_training_improves_effectiveness_and_keeps_model(tiny_gpt2, ds_gpt2):
    model, ds = tiny_gpt2, ds_gpt2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    iv = ActivScalar.for_model(model, sites=["attn_out", "mlp_out"], n_pos=ds.n_pos)
    e0 = evaluate(model, iv, ds)["effectiveness"]
    cfg = TrainConfig(epochs=4, batch_size=4, lr=0.05, progress=False)
    hist = train(model, iv, ds, cfg)
    assert list(hist.columns) == HISTORY_COLUMNS
    assert len(hist) == 4 * 2 and hist["step"].tolist() == list(range(8))
    assert hist["epoch"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert (hist[["effectiveness", "faithfulness", "minimality"]] <= 1e-6).all().all()  # KL rounding
    e1 = evaluate(model, iv, ds)["effectiveness"]
    assert e1 > e0 + 1e-3, (e0, e1)
    assert live_hooks(model) == []
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_training_is_seeded(tiny_gpt2, ds_gpt2):
    cfg = TrainConfig(epochs=1, batch_size=3, lr=0.01, progress=False)
    runs = []
    for _ in range(2):
        iv = DynScalar.for_model(tiny_gpt2, sites=["resid_post"])
        runs.append((train(tiny_gpt2, iv, ds_gpt2, cfg), iv.params["resid_post"].detach().clone()))
    assert runs[0][0].equals(runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_nan_loss_names_the_step(tiny_gpt2, ds_gpt2, monkeypatch):
    # the module, not the package's `train` function of the same name
    train_mod = importlib.import_module("mechsteer.interventions.train")
    real = train_mod.objective
    calls = []

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # the third step: epoch 1, step 2 with 2 steps per epoch
            return dataclasses.replace(terms, psi=terms.psi * float("nan"))
        return terms

    monkeypatch.setattr(train_mod, "objective", poisoned)
    iv = ActivScalar.for_model(tiny_gpt2, sites=["attn_out"], n_pos=ds_gpt2.n_pos)
    with pytest.raises(FloatingPointError, match="epoch 1, step 2"):
        train(tiny_gpt2, iv, ds_gpt2, TrainConfig(epochs=3, batch_size=4, progress=False))
    assert live_hooks(tiny_gpt2) == []


def test_evaluate_counts_hand_set(tiny_gpt2, ds_gpt2):
    n_pos = ds_gpt2.n_pos
    iv = ActivScalar.for_model(tiny_gpt2, sites=["attn_out", "z"], n_pos=n_pos)
    with torch.no_grad():
        for p in iv.params.values():
            p.zero_()
        iv.params["attn_out"][0, :2] = 0.5
        iv.params["z"][1, 0, 3] = -0.02
        iv.params["z"][1, 1, 3] = 0.01  # exactly at the threshold: negligible
    r = evaluate(tiny_gpt2, iv, ds_gpt2)
    assert r["minimality"] == 3 and r["n_params"] == 2 * n_pos + 2 * n_pos * 4
    assert "n_locations" not in r

    sv = SteerVec.for_model(tiny_gpt2, sites=["mlp_out", "z"], n_pos=n_pos)
    with torch.no_grad():
        for p in sv.params.values():
            p.zero_()
        sv.params["mlp_out"][0, 1, :5] = 0.3  # one location, 5 parameters
        sv.params["mlp_out"][1, 2, 7] = -0.2  # a second location
        sv.params["z"][0, 0, 2, :] = 0.05  # one head location, d_head parameters
    r = evaluate(tiny_gpt2, sv, ds_gpt2)
    assert r["n_locations"] == 3
    assert r["minimality"] == 5 + 1 + tiny_gpt2.cfg.d_head
    assert r["n_params"] == sv.n_params


@pytest.mark.parametrize("kind", [ActivScalar, SteerVec, DynScalar])
def test_zero_init_is_unsteered(tiny, kind):
    ds = ioi(tiny, n=8)
    iv = kind.for_model(tiny, sites=["attn_out", "resid_post"], n_pos=ds.n_pos, init_std=0.0)
    r = evaluate(tiny, iv, ds, batch_size=3)
    assert abs(r["faithfulness"]) < 1e-6 and r["minimality"] == 0
    with torch.no_grad():
        f = tiny(ds.tokens)[:, -1]
    want = effectiveness(f, f, ds.correct, ds.wrong, margin=0.0).item()
    assert r["effectiveness"] == pytest.approx(want, abs=1e-5)
    assert live_hooks(tiny) == []


def test_evaluate_splits(tiny_gpt2, ds_gpt2):
    tr, te = ds_gpt2.subset(slice(0, 5)), ds_gpt2.subset(slice(5, 8))
    iv = ActivScalar.for_model(tiny_gpt2, sites=["mlp_out"], n_pos=ds_gpt2.n_pos)
    out = evaluate_splits(tiny_gpt2, iv, tr, te)
    assert set(out) == {"train", "test"}
    assert out["test"] == evaluate(tiny_gpt2, iv, te)


def test_steer_task_init_readings(tiny_gpt2):
    """App. A.1's N(0, 1e-5): steer_task builds with std 1e-5 by default, sqrt(1e-5) with "var"."""
    from mechsteer.interventions.pipeline import steer_task

    cfg = TrainConfig(epochs=1, lr=1e-12, progress=False)  # a negligible step: the init is what is left
    runs = {r: steer_task(tiny_gpt2, "ccc", "steer_vec", ["mlp_out"], n=8, config=cfg, init_std=r) for r in ("std", "var")}
    std = {r: run.intervention.params["mlp_out"].detach().std().item() for r, run in runs.items()}
    assert std["std"] == pytest.approx(1e-5, rel=0.2) and std["var"] == pytest.approx(1e-5 ** 0.5, rel=0.2)
