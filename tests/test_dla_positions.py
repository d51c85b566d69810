"""Per-position DLA: "sources" sums over positions to the last-position DLA, "vectors"
is each position's own output through the unembedding; both on padded datasets."""

from __future__ import annotations

import pytest
import torch

from mechsteer.attribution import dla_per_position, direct_logit_attribution, direct_logit_attribution_all
from mechsteer.attribution.dla import dla_terms
from mechsteer.runs import cache_at
from mechsteer.sites import has_site
from mechsteer.tasks import ioi
from mechsteer.tasks.base import build_dataset
from mechsteer.tasks.ccc import ccc_candidates
from mechsteer.tasks.ioi import ioi_candidates
from mechsteer.tiny import tiny_model


@pytest.fixture(scope="module", params=["gpt2", "llama", "gpt2_biased", "gemma3"])
def model_ds(request):
    model = request.getfixturevalue({"gpt2": "tiny_gpt2", "llama": "tiny_llama"}.get(request.param, request.param))
    return model, ioi(model, n=4)


def close(a, b, rel=1e-4):
    a, b = a.double().cpu(), b.double().cpu()
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("metric", ["logit_diff", "logit"])
def test_sources_sum_to_the_last_position_dla(model_ds, metric):
    model, ds = model_ds
    src = dla_per_position(model, ds, site="z", mode="sources", metric=metric, per_prompt=True)
    assert src.axes == ("layer", "head", "pos") and src.per_prompt.shape[1:3] == (model.cfg.n_layers, 4)
    old = direct_logit_attribution_all(model, ds, metric=metric, per_prompt=True)
    close(src.per_prompt.sum(-1), old["z"].per_prompt)  # the identity, per prompt, per head (GQA too)
    attn = dla_per_position(model, ds, site="attn_out", mode="sources", per_prompt=True, metric=metric)
    close(attn.per_prompt, src.per_prompt.sum(2))  # summed over heads
    close(attn.per_prompt, old["attn_out"].per_prompt)  # = the existing source split of attn_out
    mlp = dla_per_position(model, ds, site="mlp_out", mode="sources", per_prompt=True, metric=metric)
    close(mlp.per_prompt, old["mlp_out"].per_prompt)


def test_vectors_last_column_is_the_dla_and_the_rest_is_each_output(model_ds):
    model, ds = model_ds
    vec = dla_per_position(model, ds, site="z", per_prompt=True)
    both = dla_per_position(model, ds, per_prompt=True)  # default: attn_out, mlp_out
    assert both.axes == ("site", "layer", "pos") and both.labels["site"] == ["attn_out", "mlp_out"]
    assert both.meta["mode"] == "vectors"
    close(vec.per_prompt[..., -1], direct_logit_attribution(model, ds, site="z", per_prompt=True).per_prompt)
    df = dla_terms(model, ds)
    for term, s in (("attn_bias", 0), ("mlp", 1)):
        part = torch.tensor(df[df.term == term].sort_values(["prompt", "layer"])["value"].values).view(len(ds), -1)
        if term == "attn_bias":
            part = part + vec.per_prompt[..., -1].sum(-1).double()  # heads + b_O = the attention output
        close(both.per_prompt[:, s, :, -1], part)
    if not has_site(model, "ln1_post_scale"):  # every position by hand: h_{l,i} / s_i . (W_U[c] - W_U[w])
        L = model.cfg.n_layers
        _, c = cache_at(model, ds.tokens, [("final_scale", None)] + [(s, l) for s in ("attn_out", "mlp_out") for l in range(L)])
        d = model.W_U[:, ds.correct].T - model.W_U[:, ds.wrong].T
        d = d - d.mean(-1, keepdim=True) if model.cfg.normalization_type in ("LN", "LNPre") else d
        for i, s in enumerate(("attn_out", "mlp_out")):
            by_hand = torch.stack([(c[(s, l)] / c[("final_scale", None)] * d[:, None]).sum(-1) for l in range(L)], 1)
            close(both.per_prompt[:, i], by_hand)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def mixed(request):
    model = tiny_model(request.param)
    cands = ccc_candidates(0, templates=[0, 1])[:6] + ioi_candidates(0, n_per_template=2)
    ds = build_dataset("mix", model, cands, n=None, seed=0, same_length=False).subset(list(range(8)))
    assert ds.is_padded
    return model, ds


@pytest.mark.parametrize("mode", ["vectors", "sources"])
def test_mixed_lengths_each_prompt_as_alone_and_pads_zero(mixed, mode):
    model, ds = mixed
    full = dla_per_position(model, ds, site="z", mode=mode, per_prompt=True, positions="end")
    lens = ds.lengths.tolist()
    for i in (1, 2, 4, 5):
        alone = dla_per_position(model, ds.subset([i]), site="z", mode=mode, per_prompt=True, positions="end")
        a = alone.per_prompt[0]
        close(full.per_prompt[i][..., -a.shape[-1]:], a)
        absent = full.per_prompt[i][..., : full.per_prompt.shape[-1] - lens[i]]
        assert absent.numel() == 0 or absent.abs().max() == 0  # positions before its start: 0
    if mode == "sources":  # pads get A = 0: the real positions alone sum to each prompt's last-position DLA
        close(full.per_prompt.sum(-1), direct_logit_attribution(model, ds, site="z", per_prompt=True).per_prompt)
    # the mean over prompts counts only the prompts that have each position
    ax = ds.position_axis("end")
    present = ax.present.double()
    mean = (full.per_prompt.double() * 1).sum(0) / present.sum(0).clamp(min=1)
    close(full.scores, mean)


def test_bad_input_is_a_clear_error(tiny_llama):
    ds = ioi(tiny_llama, n=2)
    with pytest.raises(ValueError, match="mode must be one of"):
        dla_per_position(tiny_llama, ds, mode="fig9")
    with pytest.raises(ValueError, match="site must be one of"):
        dla_per_position(tiny_llama, ds, site="resid_post")
    with pytest.raises(ValueError, match="head axis"):
        dla_per_position(tiny_llama, ds, site=["z", "attn_out"])
    with pytest.raises(ValueError, match="metric must be one of"):
        dla_per_position(tiny_llama, ds, metric="answer_prob")


@pytest.mark.integration
def test_smollm2_identities_on_mixed_lengths(smollm2):
    from mechsteer.tasks import ccc

    ds = ccc(smollm2, n=4, template=None, same_length=False)
    z = direct_logit_attribution(smollm2, ds, site="z", per_prompt=True).per_prompt
    src = dla_per_position(smollm2, ds, site="z", mode="sources", per_prompt=True, positions="end")
    close(src.per_prompt.sum(-1), z, rel=1e-3)
    vec = dla_per_position(smollm2, ds, site="z", per_prompt=True, positions="end")
    close(vec.per_prompt[..., -1], z, rel=1e-3)


def test_fig9_result_plugs_into_activation_scalars(tiny_gpt2):
    from mechsteer.interventions.from_attribution import scalars_from_result

    ds = ioi(tiny_gpt2, n=2)
    fig9 = dla_per_position(tiny_gpt2, ds)
    iv = scalars_from_result(tiny_gpt2, fig9, normalize=False)  # raw scores, as the paper plugs them in
    assert sorted(iv.sites) == ["attn_out", "mlp_out"]
    z = scalars_from_result(tiny_gpt2, dla_per_position(tiny_gpt2, ds, site="z", mode="sources"), normalize=False)
    assert list(z.sites) == ["z"]
