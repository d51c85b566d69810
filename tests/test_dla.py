"""Direct logit attribution: terms add up to the logit difference, and agree with
TransformerLens' DLA where it covers the same quantity."""

from __future__ import annotations

import pytest
import torch
from transformer_lens.tools.analysis import direct_logit_attribution as tl_dla

from mechsteer.attribution.dla import direct_logit_attribution, dla_terms
from mechsteer.sites import live_hooks
from mechsteer.tasks import ioi




_DATASETS: dict[int, object] = {}


def ioi4(model):
    """ioi(model, n=4), built once per model (tokenising the candidates dominates)."""
    if id(model) not in _DATASETS:
        _DATASETS[id(model)] = ioi(model, n=4)
    return _DATASETS[id(model)]


@pytest.fixture(scope="module", params=["gpt2", "llama", "gpt2_biased", "gemma3"])
def any_model(request, tiny_gpt2, tiny_llama):
    if request.param in ("gpt2", "llama"):
        return {"gpt2": tiny_gpt2, "llama": tiny_llama}[request.param]
    return request.getfixturevalue(request.param)


def test_terms_sum_to_the_logit_difference(any_model):
    ds = ioi4(any_model)
    clean, _ = ds.logit_diffs(any_model)
    df = dla_terms(any_model, ds)
    total = torch.tensor(df.groupby("prompt")["value"].sum().values)
    torch.testing.assert_close(total, clean.double(), atol=1e-4, rtol=0)
    H, L = any_model.cfg.n_heads, any_model.cfg.n_layers
    counts = df[df.prompt == 0].term.value_counts().to_dict()
    assert counts["head"] == L * H and counts["mlp"] == L and counts["attn_bias"] == L
    assert counts["embed"] == counts["unembed_bias"] == 1
    # the correct answer's logit alone
    logit = dla_terms(any_model, ds, metric="logit").groupby("prompt")["value"].sum()
    with torch.no_grad():
        ref = any_model(ds.tokens)[torch.arange(len(ds)), -1, ds.correct]
    torch.testing.assert_close(torch.tensor(logit.values), ref.double(), atol=1e-4, rtol=0)
    assert live_hooks(any_model) == []


def test_sites_agree_with_the_terms(any_model):
    ds = ioi4(any_model)
    df = dla_terms(any_model, ds)
    z = direct_logit_attribution(any_model, ds, site="z", per_prompt=True)
    src = direct_logit_attribution(any_model, ds, site="attn_out", per_prompt=True)
    mlp = direct_logit_attribution(any_model, ds, site="mlp_out", per_prompt=True)
    B, L, H, P = len(ds), any_model.cfg.n_layers, any_model.cfg.n_heads, ds.n_pos
    heads = torch.tensor(df[df.term == "head"].value.values, dtype=torch.float32).reshape(B, L, H)
    torch.testing.assert_close(z.per_prompt, heads, atol=1e-5, rtol=1e-4)
    # attention split by source position sums to the heads' total
    torch.testing.assert_close(src.per_prompt.sum(-1), heads.sum(-1), atol=1e-5, rtol=1e-4)
    # only the last position's MLP writes to the last residual stream
    assert (mlp.per_prompt[..., :-1] == 0).all()
    mlps = torch.tensor(df[df.term == "mlp"].value.values, dtype=torch.float32).reshape(B, L)
    torch.testing.assert_close(mlp.per_prompt[..., -1], mlps, atol=1e-5, rtol=1e-4)
    assert z.axes == ("layer", "head") and src.axes == mlp.axes == ("layer", "pos")
    assert tuple(src.scores.shape) == (L, P) and src.labels["pos"] == ds.labels
    torch.testing.assert_close(z.scores, z.per_prompt.mean(0))


def test_matches_transformer_lens(any_model):
    """TL's unit="head" gives each head's term; unit="component" each layer's attention and
    MLP output (post-norm output on Gemma) and the embedding. On Gemma TL's head terms skip
    the post-attention norm (they do not add up to its own attn_out terms), so there only
    the layer totals are compared."""
    model = any_model
    ds = ioi4(model)
    B, L, H = len(ds), model.cfg.n_layers, model.cfg.n_heads
    df = dla_terms(model, ds)
    term = lambda t: torch.tensor(df[df.term == t].value.values, dtype=torch.float32)  # noqa: E731
    z = direct_logit_attribution(model, ds, site="z", per_prompt=True)
    if not z.meta["post_norm"]:
        heads = tl_dla(model, ds.tokens, answer_tokens=ds.correct, incorrect_tokens=ds.wrong, unit="head")
        assert heads.labels[: L * H] == [f"L{l}H{h}" for l in range(L) for h in range(H)]
        torch.testing.assert_close(z.per_prompt.reshape(B, L * H), heads.attribution[: L * H].T, atol=1e-4, rtol=1e-4)
    comp = tl_dla(model, ds.tokens, answer_tokens=ds.correct, incorrect_tokens=ds.wrong, unit="component")
    ref = dict(zip(comp.labels, comp.attribution))
    attn = term("head").reshape(B, L, H).sum(-1) + term("attn_bias").reshape(B, L)
    for layer in range(L):
        torch.testing.assert_close(attn[:, layer], ref[f"{layer}_attn_out"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(term("mlp").reshape(B, L)[:, layer], ref[f"{layer}_mlp_out"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(term("embed"), ref["embed"], atol=1e-4, rtol=1e-4)
    if "pos_embed" in ref:
        torch.testing.assert_close(term("pos_embed"), ref["pos_embed"], atol=1e-4, rtol=1e-4)


def test_post_norm_models_are_flagged(gemma3, tiny_llama):
    assert direct_logit_attribution(gemma3, ioi4(gemma3)).meta["post_norm"] is True
    assert direct_logit_attribution(tiny_llama, ioi4(tiny_llama)).meta["post_norm"] is False


def test_biases_are_their_own_terms(gpt2_biased):
    df = dla_terms(gpt2_biased, ioi4(gpt2_biased))
    assert df[df.term == "attn_bias"].value.abs().min() > 1e-4
    assert df[df.term == "unembed_bias"].value.abs().min() > 1e-4


def test_bad_input_is_a_clear_error(tiny_gpt2, monkeypatch):
    ds = ioi4(tiny_gpt2)
    with pytest.raises(ValueError, match="supports sites"):
        direct_logit_attribution(tiny_gpt2, ds, site="resid_pre")
    with pytest.raises(ValueError, match="metric must be one of"):
        direct_logit_attribution(tiny_gpt2, ds, metric="prob")
    with pytest.raises(ValueError, match="linear"):
        direct_logit_attribution(tiny_gpt2, ds, metric="answer_prob")  # a registered name, not linear
    with pytest.raises(TypeError, match="linear in them"):
        direct_logit_attribution(tiny_gpt2, ds, metric=lambda logits, ds: logits[:, -1, 0].mean())
    with pytest.raises(TypeError, match="ContrastiveDataset"):
        dla_terms(tiny_gpt2, ds.tokens)
    monkeypatch.setattr(tiny_gpt2.cfg, "output_logits_soft_cap", 30.0)
    with pytest.raises(ValueError, match="soft-caps"):
        dla_terms(tiny_gpt2, ds)
    assert live_hooks(tiny_gpt2) == []


@pytest.mark.integration
def test_smollm2_terms_sum_and_match_transformer_lens(smollm2):
    ds = ioi(smollm2, n=8)
    clean, _ = ds.logit_diffs(smollm2)
    df = dla_terms(smollm2, ds)
    total = torch.tensor(df.groupby("prompt")["value"].sum().values)
    torch.testing.assert_close(total, clean.double(), atol=1e-4, rtol=0)
    z = direct_logit_attribution(smollm2, ds, site="z", per_prompt=True)
    src = direct_logit_attribution(smollm2, ds, site="attn_out", per_prompt=True)
    torch.testing.assert_close(src.per_prompt.sum(-1), z.per_prompt.sum(-1), atol=1e-4, rtol=1e-4)
    heads = tl_dla(smollm2, ds.tokens, answer_tokens=ds.correct, incorrect_tokens=ds.wrong, unit="head")
    L, H = smollm2.cfg.n_layers, smollm2.cfg.n_heads
    torch.testing.assert_close(z.per_prompt.reshape(len(ds), L * H), heads.attribution[: L * H].T, atol=1e-4, rtol=1e-4)
    assert live_hooks(smollm2) == []
