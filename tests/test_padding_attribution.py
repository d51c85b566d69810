"""Padding changes nothing: every attribution method on a mixed-length (right-padded)
dataset gives each prompt the result it gets alone, and averages per position over the
prompts that have each position.

Per-prompt results are compared on the end-relative axis (``positions="end"``), where
prompt i alone has the last ``L_i`` entries of the padded dataset's axis.
"""

from __future__ import annotations

import pytest
import torch

from mechsteer.attribution import (
    activation_patching,
    attribution_patching_all,
    direct_logit_attribution_all,
)
from mechsteer.attribution.atp_star import atp_star_all
from mechsteer.attribution.lrp import attnlrp
from mechsteer.tasks.base import build_dataset
from mechsteer.tasks.ccc import ccc_candidates
from mechsteer.tasks.ioi import ioi_candidates

PROMPTS = [1, 2, 4, 5]  # lengths 15, 20, 12, 21 of the first 8 items


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def mixed(request):
    from mechsteer.tiny import tiny_model

    model = tiny_model(request.param)
    cands = ccc_candidates(0, templates=[0, 1])[:6] + ioi_candidates(0, n_per_template=2)
    ds = build_dataset("mix", model, cands, n=None, seed=0, same_length=False).subset(list(range(8)))
    assert ds.is_padded and len(set(ds.lengths[PROMPTS].tolist())) == len(PROMPTS)
    return model, ds


def close(a, b, rel=1e-4):
    a, b = a.double().cpu(), b.double().cpu()
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * max(1.0, float(b.abs().max())))


def same_alone(model, ds, run, pos_axis=True, normalised=True):
    """``run(model, ds)`` -> per-prompt tensor ``(B, ..., pos)`` (or ``(B, ...)``); each
    prompt's row equals the one it gets alone (its last L entries on the end axis).

    Normalised scores are compared times the prompt's own gap ld_clean - ld_corr (the
    effect in logits): a random tiny model has prompts whose gap is ~1e-5, where float
    noise alone moves the normalised score by 1e-3."""
    pp = run(model, ds)
    g = gaps(model, ds) if normalised else torch.ones(len(ds))
    for i in PROMPTS:
        alone = run(model, ds.subset([i]))[0] * g[i].double()
        row = (pp[i][..., -alone.shape[-1]:] if pos_axis else pp[i]) * g[i].double()
        close(row.double(), alone.double())
        if pos_axis:  # positions before prompt i's start are absent: exactly 0
            assert pp[i][..., : pp.shape[-1] - alone.shape[-1]].abs().max() == 0 if alone.shape[-1] < pp.shape[-1] else True
    return pp


def gaps(model, ds):
    clean, corr = ds.logit_diffs(model)
    return clean - corr


def present_mean(pp, ds, weights=None):
    """Mean over the prompts having each end-relative entry (weights: per-prompt factors)."""
    ax = ds.position_axis("end")
    w = torch.ones(len(ds), dtype=torch.float64) if weights is None else weights.double()
    x = pp.double().cpu() * w.reshape(-1, *[1] * (pp.ndim - 1))
    present = ax.present.double().reshape(len(ds), *[1] * (pp.ndim - 2), -1)
    return x.sum(0) / present.sum(0).clamp(min=1)


def test_answer_read_at_each_prompts_last_token(mixed):
    model, ds = mixed
    alone = torch.cat([ds.subset([i]).logit_diffs(model)[0] for i in range(len(ds))])
    close(ds.logit_diffs(model)[0], alone)


@pytest.mark.parametrize("site", ["attn_out", "z"])
def test_atp(mixed, site):
    model, ds = mixed

    def run(m, d):
        return attribution_patching_all(m, d, sites=(site,), per_prompt=True, positions="end")[site].per_prompt

    pp = same_alone(model, ds, run)
    res = attribution_patching_all(model, ds, sites=(site,), per_prompt=True, positions="end")[site]
    g = gaps(model, ds)
    close(res.scores, present_mean(pp, ds, g) / g.double().mean())
    assert res.labels["pos"][-1] == "end" and len(res.labels["pos"]) == ds.n_pos


def test_atp_ig(mixed):
    model, ds = mixed

    def run(m, d):
        return attribution_patching_all(m, d, sites=("mlp_out",), per_prompt=True, variant="ig", steps=2,
                                        positions="end")["mlp_out"].per_prompt

    pp = same_alone(model, ds, run)
    res = attribution_patching_all(model, ds, sites=("mlp_out",), variant="ig", steps=2, positions="end")["mlp_out"]
    g = gaps(model, ds)
    close(res.scores, present_mean(pp, ds, g) / g.double().mean())


@pytest.mark.parametrize("site", ["z", "k"])
def test_atp_star(mixed, site):
    model, ds = mixed

    def run(m, d):
        return atp_star_all(m, d, sites=(site,), per_prompt=True, positions="end")[site].per_prompt

    same_alone(model, ds, run)


def test_atp_star_head_totals(mixed):
    model, ds = mixed

    def run(m, d):
        return atp_star_all(m, d, sites=("z",), per_prompt=True, head_totals=True)["z"].per_prompt

    same_alone(model, ds, run, pos_axis=False)


def test_dla(mixed):
    model, ds = mixed

    def run(m, d):
        out = direct_logit_attribution_all(m, d, per_prompt=True, positions="end")
        return out

    full = run(model, ds)
    for i in PROMPTS:
        alone = run(model, ds.subset([i]))
        close(full["z"].per_prompt[i], alone["z"].per_prompt[0])
        for s in ("attn_out", "mlp_out"):
            a = alone[s].per_prompt[0]
            close(full[s].per_prompt[i][..., -a.shape[-1]:], a)
    for s in ("attn_out", "mlp_out"):
        close(full[s].scores, present_mean(full[s].per_prompt, ds))
    close(full["z"].scores, full["z"].per_prompt.mean(0))
    # the terms still add up to each prompt's own logit difference
    total = full["z"].per_prompt.sum((1, 2))
    assert torch.isfinite(total).all()


def test_attnlrp(mixed):
    model, ds = mixed

    def run(m, d):
        return attnlrp(m, d, per_prompt=True, positions="end", progress=False)

    full = run(model, ds)
    for i in PROMPTS:
        alone = run(model, ds.subset([i]))
        close(full["heads"].per_prompt[i], alone["heads"].per_prompt[0])
        for k in ("input", "sites"):
            a = alone[k].per_prompt[0]
            close(full[k].per_prompt[i][..., -a.shape[-1]:], a)
        close(full["input"].meta["target"][i], alone["input"].meta["target"][0])
    for k in ("input", "sites"):
        close(full[k].scores, present_mean(full[k].per_prompt, ds))


def test_attnlrp_batches(mixed):
    model, ds = mixed
    one = attnlrp(model, ds, readout="input", positions="end", progress=False)
    two = attnlrp(model, ds, readout="input", positions="end", batch_size=3, progress=False)
    close(one.scores, two.scores)


@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_patching_per_position(mixed, direction):
    model, ds = mixed

    def run(m, d):
        return activation_patching(m, d, site="attn_out", per_prompt=True, positions="end", direction=direction,
                                   progress=False).per_prompt

    pp = same_alone(model, ds, run)
    res = activation_patching(model, ds, site="attn_out", positions="end", direction=direction, progress=False)
    g = gaps(model, ds)
    close(res.scores, present_mean(pp, ds, g) / g.double().mean())


def test_patching_per_head(mixed):
    model, ds = mixed

    def run(m, d):
        return activation_patching(m, d, site="z", per_position=False, per_prompt=True, progress=False).per_prompt

    pp = same_alone(model, ds, run, pos_axis=False)
    res = activation_patching(model, ds, site="z", per_position=False, progress=False)
    g = gaps(model, ds)
    close(res.scores, (pp.double() * g.double()[:, None, None]).mean(0) / g.double().mean())


def test_patching_heads_by_position(mixed):
    model, ds = mixed

    def run(m, d):
        return activation_patching(m, d, site="z", per_prompt=True, positions="end", progress=False).per_prompt

    same_alone(model, ds, run)


def test_named_positions_axis(mixed):
    model, ds = mixed
    res = attribution_patching_all(model, ds, sites=("attn_out",))["attn_out"]  # "auto": named positions here
    assert res.labels["pos"] == ds.position_axis().labels
    assert res.labels["pos"][-1] == "end" and res.scores.shape[-1] == len(res.labels["pos"])
    with pytest.raises(ValueError, match="one token length"):
        attribution_patching_all(model, ds, sites=("attn_out",), positions="tokens")
    with pytest.raises(ValueError, match="positions must be one of"):
        direct_logit_attribution_all(model, ds, positions="middle")


def test_refusals(mixed):
    model, ds = mixed
    with pytest.raises(ValueError, match="nonlinear"):
        direct_logit_attribution_all(model, ds, metric="answer_logprob")
    with pytest.raises(ValueError, match="nonlinear"):
        attnlrp(model, ds, metric="answer_logprob", progress=False)



@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_patching_custom_metric_per_position(mixed, direction):
    """A custom metric is evaluated on each prompt alone: the dataset's score times its
    gap is the mean, over the prompts having each position, of each prompt's own effect."""
    model, ds = mixed
    kw = dict(site="attn_out", metric="logit", positions="end", direction=direction, progress=False)
    full = activation_patching(model, ds, **kw)
    effects = torch.zeros(len(ds), *full.scores.shape, dtype=torch.float64)
    for i in range(len(ds)):
        alone = activation_patching(model, ds.subset([i]), **kw)
        gap = alone.meta["clean_metric"] - alone.meta["corrupted_metric"]
        effects[i, ..., -alone.scores.shape[-1]:] = alone.scores.double() * gap
    gap = full.meta["clean_metric"] - full.meta["corrupted_metric"]
    close(full.scores.double() * gap, present_mean(effects, ds))
    whole = activation_patching(model, ds, site="attn_out", metric="logit", per_position=False, progress=False)
    assert whole.axes == ("layer",) and torch.isfinite(whole.scores).all()


@pytest.mark.integration
def test_smollm2_mixed_lengths(smollm2):
    from mechsteer.tasks.base import Candidate

    cands = [
        Candidate("The capital of France is", "The capital of Italy is", " Paris", " Rome"),
        Candidate("Everyone knows that the capital city of Germany is", "Everyone knows that the capital city of Spain is",
                  " Berlin", " Madrid"),
        Candidate("When Mary and John went to the store, John gave a drink to",
                  "When Mary and John went to the store, Mary gave a drink to", " Mary", " John"),
    ]
    ds = build_dataset("mix", smollm2, cands, n=None, seed=0, same_length=False)
    assert len(set(ds.lengths.tolist())) == 3
    atp = lambda d: attribution_patching_all(smollm2, d, sites=("attn_out",), per_prompt=True,  # noqa: E731
                                             positions="end")["attn_out"].per_prompt
    dla = lambda d: direct_logit_attribution_all(smollm2, d, sites=("z", "mlp_out"), per_prompt=True,  # noqa: E731
                                                 positions="end")
    lrp = lambda d: attnlrp(smollm2, d, readout="input", per_prompt=True, positions="end",  # noqa: E731
                            progress=False).per_prompt
    full_atp, full_dla, full_lrp = atp(ds), dla(ds), lrp(ds)
    for i in range(len(ds)):
        one = ds.subset([i])
        a = atp(one)[0]
        close(full_atp[i][..., -a.shape[-1]:], a, rel=1e-3)
        d = dla(one)
        close(full_dla["z"].per_prompt[i], d["z"].per_prompt[0], rel=1e-3)
        r = lrp(one)[0]
        close(full_lrp[i][-r.shape[-1]:], r, rel=1e-3)


@pytest.mark.parametrize("variant", ["atp", "ig"])
def test_atp_head_totals(mixed, variant):
    model, ds = mixed

    def run(m, d):
        return attribution_patching_all(m, d, sites=("z",), per_prompt=True, head_totals=True, variant=variant,
                                        steps=2)["z"].per_prompt

    pp = same_alone(model, ds, run, pos_axis=False)
    res = attribution_patching_all(model, ds, sites=("z",), head_totals=True, variant=variant, steps=2)["z"]
    assert res.axes == ("layer", "head")
    g = gaps(model, ds).double()
    close(res.scores, (pp.double() * g[:, None, None]).mean(0) / g.mean())


def test_suite_mixed_lengths(mixed):
    from mechsteer.attribution import run_suite

    model, ds = mixed
    suite = run_suite(model, ds, ["patching", "atp", "atp*", "atp-ig", "dla", "attnlrp"], progress=False)
    labels = ds.position_axis().labels
    for grid in ("attn_out", "mlp_out"):
        for r in suite.results[grid].values():
            assert r.labels["pos"] == labels and r.scores.shape[-1] == len(labels)
    shapes = {tuple(r.scores.shape) for r in suite.results["heads"].values()}
    assert shapes == {(model.cfg.n_layers, model.cfg.n_heads)}
    assert set(suite.comparisons) == {"heads", "attn_out", "mlp_out"}
    end = run_suite(model, ds, ["atp", "dla"], positions="end", progress=False)
    assert end.results["attn_out"]["atp"].labels["pos"][-1] == "end"


def test_atp_custom_metric_and_denoising(mixed):
    model, ds = mixed
    for kw in ({"metric": "logit"}, {"direction": "denoising"}):
        res = attribution_patching_all(model, ds, sites=("attn_out",), positions="end", **kw)["attn_out"]
        assert torch.isfinite(res.scores).all() and res.scores.shape[-1] == ds.n_pos


RECORDS = [  # multi-token answers, three prompt lengths
    dict(prompt="When Mary and John went out, John gave a gift to",
         corrupted="When Mary and John went out, Mary gave a gift to", correct=" Mary Smith", wrong=" John"),
    dict(prompt="Mary and John talked. John thanked", corrupted="Mary and John talked. Mary thanked",
         correct=" Mary", wrong=" John Brown"),
    dict(prompt="Then John and Mary went to the store. Mary handed the long red bag to",
         corrupted="Then John and Mary went to the store. John handed the long red bag to",
         correct=" John Doe", wrong=" Mary Ann"),
]


def test_multi_token_answers(mixed):
    """First-differing-token logit difference (every method) and the teacher-forced
    answer log-probability (patching, AtP; DLA and AttnLRP refuse it) on mixed lengths."""
    from mechsteer.tasks import from_records

    model, _ = mixed
    ds = from_records(model, RECORDS)
    assert ds.multi_token and ds.is_padded
    pp = attribution_patching_all(model, ds, sites=("attn_out",), per_prompt=True, positions="end")["attn_out"].per_prompt
    g = gaps(model, ds)
    for i in range(len(ds)):
        a = attribution_patching_all(model, ds.subset([i]), sites=("attn_out",), per_prompt=True,
                                     positions="end")["attn_out"].per_prompt[0]
        close(pp[i][..., -a.shape[-1]:] * g[i], a * g[i])
    dla = direct_logit_attribution_all(model, ds, per_prompt=True)["z"].per_prompt
    close(dla.sum((1, 2)), torch.cat([direct_logit_attribution_all(model, ds.subset([i]), per_prompt=True)["z"]
                                      .per_prompt.sum((1, 2)) for i in range(len(ds))]))
    attnlrp(model, ds, progress=False)
    tf = ds.teacher_forced(model)
    kw = dict(site="attn_out", metric="answer_logprob", positions="end", progress=False)
    full = activation_patching(model, tf, **kw)
    effects = torch.zeros(len(tf), *full.scores.shape, dtype=torch.float64)
    for i in range(len(tf)):
        alone = activation_patching(model, tf.subset([i]), **kw)
        effects[i, ..., -alone.scores.shape[-1]:] = alone.scores.double() * (
            alone.meta["clean_metric"] - alone.meta["corrupted_metric"])
    close(full.scores.double() * (full.meta["clean_metric"] - full.meta["corrupted_metric"]), present_mean(effects, tf))
    res = attribution_patching_all(model, tf, sites=("attn_out",), metric="answer_logprob")["attn_out"]
    assert torch.isfinite(res.scores).all()
    for fn in (lambda: direct_logit_attribution_all(model, tf, metric="answer_logprob"),
               lambda: attnlrp(model, tf, metric="answer_logprob", progress=False)):
        with pytest.raises(ValueError, match="nonlinear"):
            fn()
