"""Token view, coloured grids, attention patterns and the notebook reprs (tiny models)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import mechsteer as ms
from mechsteer.attribution import AttributionResult, compare
from mechsteer.plots import attention_patterns
from mechsteer.views import attention_figure, grid_html, token_html


def _bg(html: str) -> list[str]:
    return re.findall(r"background:(rgb\([^)]*\))", html)


def test_token_html_is_zero_centred():
    view = token_html([1.0, 0.0, -1.0], ["a", " b", "\n"])
    red, white, blue = _bg(view.html)
    assert white == "rgb(247, 247, 247)"  # RdBu_r's midpoint: zero is white
    r, _, b = (int(v) for v in red[4:-1].split(","))
    assert r > b  # positive is red
    r, _, b = (int(v) for v in blue[4:-1].split(","))
    assert b > r  # negative is blue
    assert "\\n" in view.html and 'title="1: &#x27; b&#x27; = 0"' in view.html  # hover names the position and value
    assert view._repr_html_() == str(view)


def test_token_html_shared_zmax_and_errors():
    a = token_html([0.5], ["x"], zmax=1.0).html
    b = token_html([1.0], ["x"], zmax=2.0).html
    assert _bg(a) == _bg(b)
    with pytest.raises(ValueError, match="3 tokens"):
        token_html([1.0, 2.0], ["a", "b", "c"])
    with pytest.raises(ValueError, match="row_labels"):
        token_html(np.zeros((2, 1)), ["a"], row_labels=["x"])


def test_result_repr_html_per_axes():
    pos = AttributionResult(torch.tensor([0.1, -0.2, 0.3]), ("pos",), "attnlrp", labels={"pos": ["0:A", "1: B", "2: C"]})
    html = pos._repr_html_()
    assert html.count("class='ms-tok'") == 3 and "attnlrp" in html and ">A<" in html  # "0:" prefix dropped
    layer_pos = AttributionResult(torch.randn(2, 3), ("layer", "pos"), "dla")
    assert layer_pos._repr_html_().count("class='ms-tok'") == 6 and "layer 1" in layer_pos._repr_html_()
    heads = AttributionResult(torch.randn(3, 4), ("layer", "head"), "patching")
    assert heads._repr_html_().count("<td") == 12
    sites = AttributionResult(torch.randn(2, 2, 3), ("site", "layer", "pos"), "atp", labels={"site": ["attn_out", "mlp_out"]})
    assert "site mlp_out" in sites._repr_html_()
    three = AttributionResult(torch.randn(2, 2, 3), ("layer", "head", "pos"), "atp")
    assert "top 10" in three._repr_html_()


def test_token_view_per_prompt():
    pp = torch.tensor([[1.0, 0.0], [-1.0, 2.0]])
    r = AttributionResult(pp.mean(0), ("pos",), "patching", per_prompt=pp)
    view = r.token_view(prompt=1, tokens=["x", "y"])
    assert 'title="1: &#x27;y&#x27; = 2"' in view.html
    with pytest.raises(ValueError, match="0..1"):
        r.token_view(prompt=2)
    with pytest.raises(ValueError, match="per_prompt=True"):
        AttributionResult(pp.mean(0), ("pos",), "p").token_view(prompt=0)
    with pytest.raises(ValueError, match="no axis 'pos'"):
        AttributionResult(torch.zeros(2, 2), ("layer", "head"), "p").token_view()


def test_grid_html_shape_error():
    with pytest.raises(ValueError, match="2 x 3"):
        grid_html(np.zeros((3, 2)), ["0", "1"], ["a", "b", "c"])


def test_attention_patterns_on_tiny(tiny_llama):
    ds = ms.ioi(tiny_llama, n=2)
    fig = attention_patterns(tiny_llama, ds, layer=0, heads=[1, 3], prompt_index=1)
    assert [t.name for t in fig.data] == ["head 1", "head 3"]
    assert [t.visible for t in fig.data] == [True, False]
    z = np.asarray(fig.data[0].z, dtype=float)
    n = ds.tokens.shape[1]
    assert z.shape == (n, n) and len(set(fig.data[0].x)) == n  # token labels stay unique
    assert np.isnan(z[np.triu_indices(n, 1)]).all()  # causal: keys after the query are blank
    assert np.allclose(z[np.tril_indices(n)].reshape(-1).sum(), n, atol=1e-4)  # each query row sums to 1
    assert "layer 0" in fig.layout.title.text and "head 1" in fig.layout.title.text
    with pytest.raises(ValueError, match="heads 0..3"):
        attention_patterns(tiny_llama, "Hello there", layer=0, heads=[4])
    with pytest.raises(TypeError, match="prompt must be"):
        attention_patterns(tiny_llama, 3.5, layer=0)


def test_attention_figure_checks_shape():
    with pytest.raises(ValueError, match="query_pos"):
        attention_figure(np.ones((2, 3, 4)), ["a", "b", "c"])


def test_comparison_displays_table_and_figure(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    a = AttributionResult(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), ("layer", "pos"), "a")
    b = AttributionResult(torch.tensor([[2.0, 1.0], [3.0, 5.0]]), ("layer", "pos"), "b")
    cmp = compare([a, b], k=2)
    cmp._ipython_display_()
    assert "spearman" in shown[0].data and shown[1] is cmp.figure
