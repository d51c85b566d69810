"""The attribution suite, CLI and report section, on a tiny model."""

import json

import pytest

from mechsteer.attribution.suite import GRIDS, METHODS, run_suite
from mechsteer.cli import main
from mechsteer.sites import live_hooks
from mechsteer.tasks import ioi


@pytest.fixture(scope="module")
def suite(tiny_llama):
    return run_suite(tiny_llama, ioi(tiny_llama, n=3, template=1), progress=False)


def test_every_method_fills_every_grid_on_the_same_shape(suite, tiny_llama):
    for grid in GRIDS:
        assert set(suite.results[grid]) == set(METHODS)
        shapes = {tuple(r.scores.shape) for r in suite.results[grid].values()}
        assert len(shapes) == 1
    assert suite.results["heads"]["dla"].axes == ("layer", "head")
    assert live_hooks(tiny_llama) == []


def test_costs_and_agreement(suite):
    fe = suite.forward_equivalents
    assert set(fe) == set(METHODS) and all(v > 0 for v in fe.values())
    s = suite.summary()
    assert set(s["spearman"]) == set(GRIDS)
    assert s["spearman"]["heads"]["atp"]["atp"] == 1.0
    assert set(suite.frame()["method"]) == {r.method for r in suite.results["heads"].values()}


def test_methods_are_named_as_passed_and_write_saves_everything(suite, tmp_path):
    for grid in GRIDS:
        assert {m: r.method for m, r in suite.results[grid].items()} == {m: m for m in METHODS}
    out = suite.write(tmp_path / "att")
    assert out == tmp_path / "att"
    names = ["agreement.csv", "costs.csv", "figures.html", "scores.csv", "summary.json"]
    assert sorted(p.name for p in out.iterdir()) == names
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "ioi" and summary["model"] == suite.model_name and set(summary["methods"]) == set(METHODS)
    assert "plotly" in (out / "figures.html").read_text()


def test_one_method_writes_its_heatmaps_and_no_agreement(tiny_llama, tmp_path):
    one = run_suite(tiny_llama, ioi(tiny_llama, n=2, template=1), ["dla"], progress=False)
    assert len(one.figures()) == len(GRIDS) and not one.comparisons
    assert sorted(p.name for p in one.write(tmp_path).iterdir()) == ["costs.csv", "figures.html", "scores.csv", "summary.json"]


def test_unknown_method_is_a_clear_error(tiny_llama):
    with pytest.raises(ValueError, match="Unknown methods"):
        run_suite(tiny_llama, ioi(tiny_llama, n=2), ["gradcam"])


def test_cli_attribute_writes_tables_figures_and_summary(tmp_path):
    out = tmp_path / "att"
    assert main(["attribute", "--task", "ioi", "--methods", "atp,dla", "--n", "3", "--model", "tiny-gpt2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["agreement.csv", "costs.csv", "figures.html", "index.html", "scores.csv", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"atp", "dla"}
    assert {"seconds", "forward_equivalents"} <= set(summary["methods"]["atp"])
    assert summary["spearman"]["heads"]["atp"]["dla"] == summary["spearman"]["heads"]["dla"]["atp"]
    assert main(["attribute", "--task", "ioi", "--methods", "atp,nope", "--model", "tiny-gpt2", "--out", str(out)]) == 2
