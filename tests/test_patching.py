"""Activation patching: equal to transformer_lens.patching on the same grid, and fast paths
that change nothing (batched rows, starting at the patched layer, skipping no-op cells)."""

from dataclasses import replace

import pandas as pd
import pytest
import torch
import transformer_lens.patching as tlp

from mechsteer import runs
from mechsteer.attribution import activation_patching
from mechsteer.metrics import DATASET_METRICS, answer_prob, default_metric
from mechsteer.sites import live_hooks
from mechsteer.tasks import ioi


@pytest.fixture(scope="module")
def ds_of():
    cache = {}

    def get(model):
        if id(model) not in cache:
            cache[id(model)] = ioi(model, n=4)
        return cache[id(model)]

    return get


def _tl_raw(model, ds, direction, tl_fn, metric=default_metric):
    """TransformerLens' raw patched metric values on the same runs."""
    base, source = (ds.corrupted_tokens, ds.tokens) if direction == "denoising" else (ds.tokens, ds.corrupted_tokens)
    _, cache = model.run_with_cache(source)
    return tl_fn(model, base, cache, lambda logits: metric(logits, ds))


def _raw(result):
    """Undo the normalisation: the patched metric values."""
    clean, corr = result.meta["clean_metric"], result.meta["corrupted_metric"]
    s = result.scores
    return corr + s * (clean - corr) if result.meta["direction"] == "denoising" else clean - s * (clean - corr)


def _resid_post(model, tokens, cache, metric):
    return tlp.generic_activation_patch(
        model, tokens, cache, metric, tlp.layer_pos_patch_setter, "resid_post", index_axis_names=("layer", "pos")
    )


CASES = {  # site, per_position -> TL function and how to permute its axes to ours
    ("resid_pre", True): (tlp.get_act_patch_resid_pre, None),
    ("resid_mid", True): (tlp.get_act_patch_resid_mid, None),
    ("resid_post", True): (_resid_post, None),
    ("attn_out", True): (tlp.get_act_patch_attn_out, None),
    ("mlp_out", True): (tlp.get_act_patch_mlp_out, None),
    ("z", False): (tlp.get_act_patch_attn_head_out_all_pos, None),
    ("z", True): (tlp.get_act_patch_attn_head_out_by_pos, (0, 2, 1)),  # TL: (layer, pos, head)
}


@pytest.mark.parametrize("direction", ["denoising", "noising"])
@pytest.mark.parametrize("case", list(CASES), ids=lambda c: f"{c[0]}-{'pos' if c[1] else 'all'}")
def test_equals_transformer_lens(tiny, ds_of, case, direction):
    ds = ds_of(tiny)
    (site, per_position), (tl_fn, perm) = case, CASES[case]
    result = activation_patching(tiny, ds, site=site, per_position=per_position, direction=direction, progress=False)
    ref = _tl_raw(tiny, ds, direction, tl_fn)
    ref = ref.permute(*perm) if perm else ref
    assert result.scores.shape == ref.shape
    torch.testing.assert_close(_raw(result), ref.cpu(), atol=1e-4, rtol=0)
    clean, corr = default_metric(tiny(ds.tokens), ds), default_metric(tiny(ds.corrupted_tokens), ds)
    assert result.meta["clean_metric"] == pytest.approx(clean.item(), abs=1e-5)
    assert result.meta["corrupted_metric"] == pytest.approx(corr.item(), abs=1e-5)
    assert result.meta["skipped_lower_blocks"] and result.meta["reused_prefix"]  # fast paths gave TL's numbers
    assert live_hooks(tiny) == []


def test_custom_metric_equals_transformer_lens(tiny_llama, ds_of):
    ds = ds_of(tiny_llama)

    def prob_correct(logits, ds):
        return answer_prob(logits, ds.correct)

    result = activation_patching(tiny_llama, ds, site="z", per_position=False, metric=prob_correct,
                                 direction="denoising", progress=False)
    ref = _tl_raw(tiny_llama, ds, "denoising", tlp.get_act_patch_attn_head_out_all_pos, prob_correct)
    torch.testing.assert_close(_raw(result), ref.cpu(), atol=1e-5, rtol=0)
    assert result.metric == "prob_correct"


def test_custom_metric_reading_every_position_equals_transformer_lens(tiny_gpt2, ds_of):
    # Runs resumed mid-prompt get the unchanged prefix's logits from the unpatched run.
    ds = ds_of(tiny_gpt2)

    def mean_logprob_bos(logits, ds):
        return logits.log_softmax(-1)[:, :, 0].mean()

    result = activation_patching(tiny_gpt2, ds, site="attn_out", metric=mean_logprob_bos, direction="denoising",
                                 progress=False)
    ref = _tl_raw(tiny_gpt2, ds, "denoising", tlp.get_act_patch_attn_out, mean_logprob_bos)
    torch.testing.assert_close(_raw(result), ref.cpu(), atol=1e-4, rtol=0)


def test_default_direction_is_noising_and_metric_names(tiny_gpt2, ds_of):
    ds = ds_of(tiny_gpt2)
    default = activation_patching(tiny_gpt2, ds, site="mlp_out", progress=False)
    noising = activation_patching(tiny_gpt2, ds, site="mlp_out", direction="noising", metric="logit_diff", progress=False)
    assert default.meta["direction"] == "noising" and default.metric == noising.metric == "logit_diff"
    torch.testing.assert_close(default.scores, noising.scores)
    named = activation_patching(tiny_gpt2, ds, site="mlp_out", metric="logit", progress=False)
    by_fn = activation_patching(tiny_gpt2, ds, site="mlp_out", metric=DATASET_METRICS["logit"], progress=False)
    assert named.metric == "logit"
    torch.testing.assert_close(named.scores, by_fn.scores)
    with pytest.raises(ValueError, match="Unknown metric"):
        activation_patching(tiny_gpt2, ds, metric="prob")


def test_axes_labels_and_site_stacking(tiny_gpt2, ds_of):
    ds = ds_of(tiny_gpt2)
    both = activation_patching(tiny_gpt2, ds, site=["attn_out", "mlp_out"], progress=False)
    assert both.axes == ("site", "layer", "pos") and both.labels["site"] == ["attn_out", "mlp_out"]
    assert both.labels["pos"] == ds.labels and both.method == "patching" and both.metric == "logit_diff"
    mlp = activation_patching(tiny_gpt2, ds, site="mlp_out", progress=False)
    torch.testing.assert_close(both.select(site="mlp_out").scores, mlp.scores)
    heads = activation_patching(tiny_gpt2, ds, site="z", per_position=True, progress=False)
    assert heads.axes == ("layer", "head", "pos") and tuple(heads.scores.shape) == (2, 4, ds.n_pos)
    assert activation_patching(tiny_gpt2, ds, site="attn_out", per_position=False, progress=False).axes == ("layer",)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_patching_the_whole_residual_stream_gives_the_full_effect(tiny, ds_of, direction):
    # On the bridge, hook_resid_mid is ln2's input hook: only an in-place patch reaches the
    # skip connection too. Patching every position of any residual site must score 1.
    ds = ds_of(tiny)
    r = activation_patching(tiny, ds, site=["resid_pre", "resid_mid", "resid_post"], per_position=False,
                            direction=direction, progress=False)
    torch.testing.assert_close(r.scores, torch.ones_like(r.scores), atol=1e-4, rtol=0)


def test_cells_whose_patch_changes_nothing_score_zero(tiny_llama, ds_of):
    ds = ds_of(tiny_llama)
    first_diff = int((ds.tokens != ds.corrupted_tokens).any(0).nonzero()[0])
    r = activation_patching(tiny_llama, ds, site="z", per_position=True, progress=False)
    assert first_diff > 0 and (r.scores[..., :first_diff] == 0).all()
    assert r.meta["cells_run"] < r.meta["cells"]


def test_batch_size_does_not_change_results(tiny_gpt2, ds_of):
    ds = ds_of(tiny_gpt2)
    one_cell = activation_patching(tiny_gpt2, ds, site="z", per_position=True, batch_size=1, progress=False)
    assert one_cell.meta["rows_per_forward"] == len(ds)
    many = activation_patching(tiny_gpt2, ds, site="z", per_position=True, batch_size=10_000, progress=False)
    assert many.meta["forwards"] < one_cell.meta["forwards"]  # one per (layer, group of start positions)
    # 1e-4 as against TransformerLens: merged groups recompute the positions before a cell's
    # start (other float rounding), and scores divide by a small clean - corrupted gap here
    torch.testing.assert_close(one_cell.scores, many.scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("site", ["attn_out", "z"])
def test_merging_start_positions_changes_no_number(tiny_llama, ds_of, monkeypatch, site):
    from mechsteer.attribution import _patch_engine as engine

    ds = ds_of(tiny_llama)
    merged = activation_patching(tiny_llama, ds, site=site, per_position=True, progress=False)
    monkeypatch.setattr(engine, "FORWARD_COST_ROWS", 0)  # one run per start position
    exact = activation_patching(tiny_llama, ds, site=site, per_position=True, progress=False)
    assert merged.meta["forwards"] < exact.meta["forwards"]
    torch.testing.assert_close(merged.scores, exact.scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_per_prompt_scores_weighted_by_their_denominators_average_to_the_score(tiny_gpt2, ds_of, direction):
    # The score normalises the *mean* logit difference; per-prompt scores normalise each
    # prompt's own. So the plain mean differs, but the mean weighted by each prompt's
    # ld_clean - ld_corr is the score exactly (the metric is linear in the prompts).
    ds = ds_of(tiny_gpt2)
    r = activation_patching(tiny_gpt2, ds, site="attn_out", direction=direction, per_prompt=True, progress=False)
    assert r.per_prompt.shape == (len(ds), *r.scores.shape)
    ld_clean, ld_corr = ds.logit_diffs(tiny_gpt2)
    w = (ld_clean - ld_corr) / (ld_clean - ld_corr).sum()
    torch.testing.assert_close((r.per_prompt * w[:, None, None]).sum(0), r.scores, atol=1e-4, rtol=0)
    assert not torch.allclose(r.per_prompt.mean(0), r.scores, atol=1e-3)
    heads = activation_patching(tiny_gpt2, ds, site="z", per_position=False, per_prompt=True, progress=False)
    assert heads.per_prompt.shape == (len(ds), 2, 4)


def test_start_at_layer_with_skipped_blocks_is_exact(tiny, ds_of):
    # Rotary positions (llama) and learned positions (gpt2) survive re-entry at block l.
    ds = ds_of(tiny)
    with torch.no_grad():
        logits, cache = tiny.run_with_cache(ds.tokens, names_filter=lambda n: n.endswith("hook_resid_pre"))
        fmt = runs.skipping_works(tiny, cache["blocks.1.hook_resid_pre"][:1], 1)
        assert fmt is not None
        for layer in range(tiny.cfg.n_layers):
            with runs.skip_blocks_below(tiny, layer, fmt):
                out = tiny(cache[f"blocks.{layer}.hook_resid_pre"], start_at_layer=layer)
            torch.testing.assert_close(out, logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(tiny(ds.tokens), logits)  # blocks restored


def test_bad_input_is_a_clear_error(tiny_gpt2, ds_of):
    ds = ds_of(tiny_gpt2)
    with pytest.raises(ValueError, match="Did you mean 'attn_out'"):
        activation_patching(tiny_gpt2, ds, site="attn_outt")
    with pytest.raises(ValueError, match="does not support site 'pattern'"):
        activation_patching(tiny_gpt2, ds, site="pattern")
    with pytest.raises(ValueError, match="cannot be stacked"):
        activation_patching(tiny_gpt2, ds, site=["z", "attn_out"])
    with pytest.raises(ValueError, match="direction"):
        activation_patching(tiny_gpt2, ds, direction="forwards")
    shorter = replace(ds)  # bypass __init__ (its shape checks would refuse this dataset)
    object.__setattr__(shorter, "corrupted_tokens", ds.corrupted_tokens[:, :-1])
    with pytest.raises(ValueError, match="differ in shape"):
        activation_patching(tiny_gpt2, shorter)
    with pytest.raises(ValueError, match="scalar"):
        activation_patching(tiny_gpt2, ds, metric=lambda logits, ds: logits[:, -1, 0], progress=False)
    with pytest.raises(ValueError, match="per_prompt"):
        activation_patching(tiny_gpt2, ds, metric=default_metric, per_prompt=True)
    assert live_hooks(tiny_gpt2) == []


def test_no_hooks_or_skipped_blocks_left_after_an_error_in_the_metric(tiny_llama, ds_of):
    ds = ds_of(tiny_llama)
    before = tiny_llama(ds.tokens)
    calls = []

    def flaky(logits, ds):
        calls.append(1)
        if len(calls) > 3:  # fails mid-sweep, after the clean/corrupted baselines
            raise RuntimeError("metric failed")
        return default_metric(logits, ds)

    with pytest.raises(RuntimeError, match="metric failed"):
        activation_patching(tiny_llama, ds, site="z", per_position=False, metric=flaky, batch_size=1, progress=False)
    assert live_hooks(tiny_llama) == []
    torch.testing.assert_close(tiny_llama(ds.tokens), before)


@pytest.mark.integration
def test_smollm2_heads_equal_transformer_lens(smollm2):
    ds = ioi(smollm2, n=2)
    r = activation_patching(smollm2, ds, site="z", per_position=False, direction="denoising", progress=False)
    assert r.meta["skipped_lower_blocks"] and r.meta["reused_prefix"]
    assert r.meta["clean_metric"] > r.meta["corrupted_metric"]
    layers = [0, 14, 29]
    index_df = pd.DataFrame([(l, h) for l in layers for h in range(smollm2.cfg.n_heads)], columns=["layer", "head"])
    _, cache = smollm2.run_with_cache(ds.tokens, names_filter=lambda n: n.endswith("attn.hook_z"))
    ref = tlp.generic_activation_patch(
        smollm2, ds.corrupted_tokens, cache, lambda logits: default_metric(logits, ds),
        tlp.layer_head_vector_patch_setter, "z", index_df=index_df,
    )
    torch.testing.assert_close(_raw(r)[layers].reshape(-1), ref.cpu(), atol=1e-4, rtol=0)


def test_max_memory_sizes_the_patched_runs_and_keeps_the_numbers(tiny_llama):
    ds = ioi(tiny_llama, n=4)
    big = activation_patching(tiny_llama, ds, site="attn_out", progress=False, max_memory="64MB")
    small = activation_patching(tiny_llama, ds, site="attn_out", progress=False, max_memory=200_000)
    assert small.meta["rows_per_forward"] < big.meta["rows_per_forward"]
    assert small.meta["forwards"] > big.meta["forwards"]
    torch.testing.assert_close(small.scores, big.scores, rtol=1e-4, atol=1e-5)  # other batch sizes, float32 rounding
    with pytest.raises(ValueError, match="max_memory"):
        activation_patching(tiny_llama, ds, site="attn_out", progress=False, max_memory="lots")


def test_run_suite_passes_max_memory_and_checks_it_first(tiny_llama):
    from mechsteer.attribution import run_suite
    ds = ioi(tiny_llama, n=4)
    suite = run_suite(tiny_llama, ds, ["patching", "attnlrp"], progress=False, max_memory="1MB")
    assert set(suite.results["heads"]) == {"patching", "attnlrp"}
    with pytest.raises(ValueError, match="max_memory"):
        run_suite(tiny_llama, ds, ["dla"], progress=False, max_memory=-1)
