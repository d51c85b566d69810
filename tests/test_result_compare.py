import numpy as np
import pandas as pd
import pytest
import torch

from mechsteer.attribution import AttributionResult, stack_sites
from mechsteer.attribution.compare import compare, jaccard, spearman


def result(scores, axes=("layer", "pos"), method="m", **kw):
    return AttributionResult(torch.as_tensor(scores, dtype=torch.float32), axes, method, **kw)


def test_result_validates_its_axes_and_labels():
    with pytest.raises(ValueError, match="Unknown axes"):
        result(torch.zeros(2, 3), ("layer", "token"))
    with pytest.raises(ValueError, match="axes are"):
        result(torch.zeros(2, 3), ("layer",))
    with pytest.raises(ValueError, match="labels for axis 'pos'"):
        result(torch.zeros(2, 3), labels={"pos": ["a", "b"]})
    with pytest.raises(ValueError, match="per_prompt"):
        result(torch.zeros(2, 3), per_prompt=torch.zeros(4, 3, 2))


def test_tidy_frame_top_k_select_and_sum():
    r = result([[0.1, -3.0, 0.2], [2.0, 0.0, -0.5]], labels={"pos": ["a", "b", "c"]}, per_prompt=torch.randn(5, 2, 3))
    df = r.to_frame()
    assert list(df.columns) == ["method", "layer", "pos", "token", "score"] and len(df) == 6
    assert r.top_k(2)[["layer", "pos"]].values.tolist() == [[0, 1], [1, 0]]
    assert r.top_k(1, by="neg")["token"].tolist() == ["b"]
    assert len(r.to_frame(per_prompt=True)) == 30
    assert r.select(layer=1).scores.tolist() == pytest.approx([2.0, 0.0, -0.5])
    heads = result(torch.ones(2, 4, 3), ("layer", "head", "pos"))
    assert heads.sum("pos").axes == ("layer", "head") and heads.sum("pos").scores[0, 0] == 3
    with pytest.raises(ValueError, match="no per-prompt"):
        heads.to_frame(per_prompt=True)


def test_plots_are_heatmaps_with_token_labels():
    r = result(torch.randn(3, 4), labels={"pos": ["0:The", "1: cat", "2: sat", "3:."]})
    fig = r.plot()
    assert fig.data[0].type == "heatmap" and list(fig.data[0].x) == r.labels["pos"]
    both = stack_sites([r, r], ["attn_out", "mlp_out"])
    assert both.axes == ("site", "layer", "pos")
    assert len(both.plot().data) == 2
    assert both.select(site="mlp_out").scores.shape == (3, 4)


def test_spearman_matches_a_reference():
    a, b = torch.randn(50), torch.randn(50)
    b[:10] = b[10:20]  # ties
    # reference: pandas' average ranks + numpy's Pearson correlation (= Spearman's rho)
    ra, rb = pd.Series(a.numpy()).rank().to_numpy(), pd.Series(b.numpy()).rank().to_numpy()
    expected = np.corrcoef(ra, rb)[0, 1]
    assert spearman(a, b) == pytest.approx(expected, abs=1e-9)
    assert jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)


def test_compare_tables_and_figure():
    base = torch.randn(4, 6)
    rs = [result(base, method="a"), result(2 * base, method="b"), result(-base, method="c")]
    cmp = compare(rs, k=5)
    assert cmp.spearman.loc["a", "b"] == pytest.approx(1.0)
    assert cmp.spearman.loc["a", "c"] == pytest.approx(-1.0)
    assert cmp.jaccard.loc["a", "c"] == 1.0  # same |score| ranking
    assert len(cmp.pairs) == 3 and len(cmp.figure.data) == 3
    zmax = {t.zmax for t in cmp.figure.data}
    assert zmax == {1.0}


def test_compare_rejects_mismatched_grids():
    with pytest.raises(ValueError, match="same grid"):
        compare([result(torch.zeros(2, 3), method="a"), result(torch.zeros(2, 4), method="b")])
    with pytest.raises(ValueError, match="at least two"):
        compare([result(torch.zeros(2, 3))])
    with pytest.raises(ValueError, match="unique"):
        compare([result(torch.zeros(2, 3)), result(torch.zeros(2, 3))])
