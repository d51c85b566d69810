"""CCC templates of different lengths and the transfer matrix (seed paper 003, Sec. 5, Fig. 6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mechsteer.interventions import ActivScalar, DynScalar
from mechsteer.interventions.evaluate import evaluate
from mechsteer.interventions.train import TrainConfig
from mechsteer.interventions.transfer import (
    BASELINE,
    runs_on_length,
    transfer_figure,
    transfer_matrix,
)
from mechsteer.sites import live_hooks
from mechsteer.tasks import ccc
from mechsteer.tasks.data import CCC_TEMPLATE, CCC_TEMPLATES

FAST = TrainConfig(epochs=1, batch_size=8, progress=False)


def _facts(ds):
    return [(m["country"], m["in_context"]) for m in ds.meta]


# --- CCC templates ----------------------------------------------------------------
def test_ccc_templates_differ_in_length_and_keep_the_conflict(tiny_gpt2):
    assert CCC_TEMPLATE == CCC_TEMPLATES[0] and len(CCC_TEMPLATES) >= 3
    sets = [ccc(tiny_gpt2, n=8, template=t) for t in range(len(CCC_TEMPLATES))]
    assert len({ds.n_pos for ds in sets}) == len(CCC_TEMPLATES)
    assert ccc(tiny_gpt2, n=8).prompts == sets[0].prompts  # the default is template 0
    for t, ds in enumerate(sets):
        assert _facts(ds) == _facts(sets[0])  # same facts, same order: splits line up
        for p, q, c, w, m in zip(ds.prompts, ds.corrupted_prompts, ds.correct_answers, ds.wrong_answers, ds.meta):
            assert m["template"] == t
            assert p == CCC_TEMPLATES[t].format(country=m["country"], capital=w[1:])
            assert q == CCC_TEMPLATES[t].format(country=m["country"], capital=c[1:])


def test_ccc_template_lists_and_errors(tiny_gpt2):
    mixed = ccc(tiny_gpt2, n=None, template=[0, 2])
    assert {m["template"] for m in mixed.meta} == {0} and mixed.n_pos == ccc(tiny_gpt2, n=4).n_pos  # modal length
    assert len(ccc(tiny_gpt2, n=4, template=None)) == 4
    for bad in (len(CCC_TEMPLATES), -1, []):
        with pytest.raises(ValueError, match="template"):
            ccc(tiny_gpt2, n=4, template=bad)


@pytest.mark.integration
def test_ccc_templates_on_smollm2(smollm2):
    sets = [ccc(smollm2, n=None, template=t) for t in range(len(CCC_TEMPLATES))]
    assert len({ds.n_pos for ds in sets}) == len(CCC_TEMPLATES)
    assert all(_facts(ds) == _facts(sets[0]) for ds in sets)
    assert min(len(ds) for ds in sets) >= 32
    from mechsteer.tasks.ccc import CCC_PARAPHRASES, ccc_paraphrase

    para = ccc_paraphrase(smollm2, n=None)  # Table 2's C: the first paraphrase has template 0's length
    assert para.n_pos == sets[0].n_pos and _facts(para) == _facts(sets[0]) and para.meta[0]["template"] == "paraphrase 0"
    assert para.prompts[0].startswith(CCC_PARAPHRASES[0][:3])


# --- transfer matrix --------------------------------------------------------------
@pytest.fixture(scope="module")
def sets(tiny_gpt2):
    # a and b share a length (template 0, different seeds); c is shorter (template 1)
    return {"a": ccc(tiny_gpt2, n=8), "b": ccc(tiny_gpt2, n=8, seed=1), "c": ccc(tiny_gpt2, n=8, template=1)}


def test_transfer_matrix_layout_and_nan_rule(tiny_gpt2, sets):
    make = lambda m, ds: ActivScalar.for_model(m, sites=["attn_out"], n_pos=ds.n_pos)
    df, ivs = transfer_matrix(tiny_gpt2, make, sets, FAST, return_interventions=True, progress=False)
    assert list(df.index) == [BASELINE, "a", "b", "c"] and df.index.name == "train"
    assert df["effectiveness"].shape == df["faithfulness"].shape == (4, 3)
    assert list(df["effectiveness"].columns) == ["a", "b", "c"]
    lengths = {k: v.n_pos for k, v in sets.items()}
    for metric in ("effectiveness", "faithfulness"):
        for tr in "abc":
            for te in "abc":
                assert math.isnan(df[metric].loc[tr, te]) == (lengths[tr] != lengths[te])
    # a cell is evaluate() of the trained intervention on the test set's test split
    assert df["effectiveness"].loc["a", "b"] == pytest.approx(
        evaluate(tiny_gpt2, ivs["a"], sets["b"].split()[1])["effectiveness"]
    )
    assert set(ivs) == {"a", "b", "c"} and live_hooks(tiny_gpt2) == []


def test_transfer_baseline_row_is_the_unsteered_model(tiny_gpt2, sets):
    make = lambda m, ds: DynScalar.for_model(m, sites=["attn_out", "mlp_out"])
    df = transfer_matrix(tiny_gpt2, make, sets, FAST, progress=False)
    assert not df.isna().any().any()  # DynScalar runs on every length
    assert (df["faithfulness"].loc[BASELINE] == 0).all()
    for name, ds in sets.items():
        identity = DynScalar.for_model(tiny_gpt2, sites=["attn_out"])
        with torch.no_grad():
            identity.params["attn_out"].zero_()
        want = evaluate(tiny_gpt2, identity, ds.split()[1])["effectiveness"]
        assert df["effectiveness"].loc[BASELINE, name] == pytest.approx(want, abs=1e-5)
    assert list(transfer_matrix(tiny_gpt2, make, {"a": sets["a"]}, FAST, baseline=False, progress=False).index) == ["a"]


def test_runs_on_length_and_errors(tiny_gpt2, sets):
    assert runs_on_length(DynScalar(n_layers=2, d_model=8), 5)
    assert runs_on_length(ActivScalar(n_layers=2, d_model=8, positions="last"), 5)
    assert not runs_on_length(ActivScalar(n_layers=2, d_model=8, n_pos=4), 5)
    make = lambda m, ds: DynScalar.for_model(m, sites=["attn_out"])
    with pytest.raises(ValueError, match="empty"):
        transfer_matrix(tiny_gpt2, make, {}, FAST)
    with pytest.raises(ValueError, match="unsteered"):
        transfer_matrix(tiny_gpt2, make, {BASELINE: sets["a"]}, FAST)
    with pytest.raises(TypeError, match="Intervention"):
        transfer_matrix(tiny_gpt2, lambda m, ds: None, {"a": sets["a"]}, FAST, progress=False)


def test_transfer_figure():
    import pandas as pd

    cols = pd.MultiIndex.from_product([["effectiveness", "faithfulness"], ["a", "c"]], names=["metric", "test"])
    df = pd.DataFrame([[-0.5, -0.6, 0.0, 0.0], [-0.1, np.nan, -0.2, np.nan]], index=["(none)", "a"], columns=cols)
    fig = transfer_figure(df)
    (t,) = fig.data
    assert list(t.x) == ["a", "c"] and list(t.y) == ["(none)", "a"]
    assert [list(r) for r in t.text] == [["-0.5", "-0.6"], ["-0.1", "n/a"]]
    assert fig.layout.yaxis.autorange == "reversed" and "E_0" in fig.layout.title.text
    assert list(transfer_figure(df, "faithfulness").data[0].text[1]) == ["-0.2", "n/a"]
    with pytest.raises(ValueError, match="no metric"):
        transfer_figure(df, "accuracy")


# --- Table 2: template change at the same length ------------------------------------
def test_ccc_paraphrase_same_length_same_facts_other_positions(tiny_gpt2):
    from mechsteer.tasks.ccc import CCC_PARAPHRASES, ccc_paraphrase

    base, para = ccc(tiny_gpt2, n=8), ccc_paraphrase(tiny_gpt2, n=8)
    assert para.n_pos == base.n_pos and _facts(para) == _facts(base)
    assert para.correct.tolist() == base.correct.tolist() and para.wrong.tolist() == base.wrong.tolist()
    assert para.meta[0]["template"].startswith("paraphrase") and para.prompts[0] != base.prompts[0]
    assert para.prompts[0].replace(para.meta[0]["in_context"], "{capital}").replace(
        para.meta[0]["country"], "{country}") in CCC_PARAPHRASES
    # the task's tokens sit elsewhere: the country of the context moves
    pa, ba = para.position_axis("named"), base.position_axis("named")
    assert pa.labels == ba.labels and pa.labels[0] == "country"
    assert not torch.equal(pa.index[:, 0], ba.index[:, 0])


def test_template_table_has_no_nan(tiny_gpt2):
    from mechsteer.interventions.transfer import TABLE2_COLUMNS, template_table

    df = template_table(tiny_gpt2, config=FAST, n=8, progress=False)
    assert list(df.index) == ["ActivScalar", "SteerVec", "DynScalar"]
    assert df.notna().all().all() and (df[list(TABLE2_COLUMNS)] <= 1e-6).all().all()
    slots = template_table(tiny_gpt2, ["activ_scalar"], FAST, n=8, axis="end", template=1, progress=False)
    assert slots.notna().all().all()
    with pytest.raises(ValueError, match="axis='end'"):
        template_table(tiny_gpt2, ["activ_scalar"], FAST, n=8, template=1, progress=False)
