"""The ``v`` site (value vectors, per KV head on GQA models) as an intervention site
(seed paper 003, Fig. 7: scaling a head's values, as Yu et al. do for a memory head)."""

from __future__ import annotations

import pytest
import torch

from mechsteer.interventions import ActivScalar, DynScalar, SteerVec
from mechsteer.interventions.train import TrainConfig, train
from mechsteer.sites import hook_name, live_hooks
from mechsteer.tasks import ccc


def _ds(model):
    return ccc(model, n=4)


def test_v_shapes_follow_kv_heads(tiny_llama):
    cfg = tiny_llama.cfg
    assert cfg.n_key_value_heads < cfg.n_heads  # GQA: the tiny llama has fewer KV heads
    ds = _ds(tiny_llama)
    iv = ActivScalar.for_model(tiny_llama, sites=["v"], n_pos=ds.n_pos)
    assert iv.alpha("v").shape == (cfg.n_layers, ds.n_pos, cfg.n_key_value_heads)
    sv = SteerVec.for_model(tiny_llama, sites=["v"], n_pos=ds.n_pos)
    assert sv.n_params == cfg.n_layers * ds.n_pos * cfg.n_key_value_heads * cfg.d_head
    assert DynScalar.for_model(tiny_llama, sites=["v"]).params["v"].shape == (cfg.n_layers, cfg.n_key_value_heads, cfg.d_head)


@pytest.mark.parametrize("cls", [ActivScalar, SteerVec, DynScalar])
def test_v_zero_init_is_identity(tiny, cls):
    ds = _ds(tiny)
    iv = cls.for_model(tiny, sites=["v"], n_pos=ds.n_pos)
    with torch.no_grad():
        iv.params["v"].zero_()
    clean = tiny(ds.tokens)
    for beta in (1.0, -1.0):
        assert torch.equal(iv(tiny, ds.tokens, beta), clean)
    assert live_hooks(tiny) == []


def test_v_alpha_minus_one_zeroes_kv_head(tiny_llama):
    """alpha = -1 at (layer 1, every position, KV head 0) at beta = 1 is zeroing that KV head's values."""
    model, ds = tiny_llama, _ds(tiny_llama)
    iv = ActivScalar.for_model(model, sites=["v"], layers=[1], n_pos=ds.n_pos)
    with torch.no_grad():
        iv.params["v"].zero_()
        iv.params["v"][0, :, 0] = -1.0

    def zero_head(x, hook):
        x = x.clone()
        x[:, :, 0] = 0.0
        return x

    want = model.run_with_hooks(ds.tokens, fwd_hooks=[(hook_name("v", 1, model), zero_head)])
    torch.testing.assert_close(iv(model, ds.tokens, 1.0), want)
    assert not torch.allclose(want, model(ds.tokens))  # the edit is visible
    # beta = -1 doubles the head's values instead
    double = model.run_with_hooks(ds.tokens, fwd_hooks=[(hook_name("v", 1, model), lambda x, hook: x * torch.tensor(
        [2.0] + [1.0] * (x.shape[2] - 1)).view(1, 1, -1, 1))])
    torch.testing.assert_close(iv(model, ds.tokens, -1.0), double)


@pytest.mark.parametrize("cls", [ActivScalar, SteerVec])
def test_v_gradients_flow_and_training_moves_params(tiny, cls):
    ds = _ds(tiny)
    iv = cls.for_model(tiny, sites=["v"], n_pos=ds.n_pos)
    logits = iv(tiny, ds.tokens, 1.0)
    (g,) = torch.autograd.grad(logits[:, -1].logsumexp(-1).sum(), [iv.params["v"]])
    assert g.abs().sum() > 0
    before = iv.params["v"].detach().clone()
    train(tiny, iv, ds, TrainConfig(epochs=2, batch_size=4, lr=1e-2, progress=False))
    assert not torch.equal(before, iv.params["v"].detach())


def test_v_kv_head_mismatch_refused(tiny_llama):
    cfg = tiny_llama.cfg
    iv = ActivScalar(["v"], n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head,
                     n_kv_heads=cfg.n_heads, n_pos=5)  # as if MHA
    with pytest.raises(ValueError, match="n_key_value_heads"), iv.apply(tiny_llama, 1.0):
        pass
    assert live_hooks(tiny_llama) == []


def test_v_alpha_heatmap_has_kv_head_panels(tiny_llama):
    from mechsteer.interventions.plots import alpha_heatmap

    ds = _ds(tiny_llama)
    iv = ActivScalar.for_model(tiny_llama, sites=["mlp_out", "v"], n_pos=ds.n_pos)
    fig = alpha_heatmap(iv, ds)
    names = [t.name for t in fig.data]
    assert names[0] == "mlp_out" and names[1].startswith("v @ ")
    assert len(fig.data[1].x) == tiny_llama.cfg.n_key_value_heads
