"""SteerRun and ParetoRun: computed once, written without the model (presentation one-way)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from mechsteer.interventions import (
    ParetoRun,
    TrainConfig,
    beta_sweep,
    flip_beta,
    load_intervention,
    pareto_search,
    read_metadata,
    steer_task,
)
from mechsteer.interventions.kinds import KINDS, kind_class
from mechsteer.interventions.objective import faithfulness
from mechsteer.models import fingerprint

CFG = TrainConfig(epochs=1, batch_size=4, progress=False)


@pytest.mark.parametrize("method", list(KINDS))
def test_steer_run_writes_without_the_model(tiny_gpt2, tmp_path, method):
    run = steer_task(tiny_gpt2, "ccc", method, ["attn_out"], n=8, config=CFG)
    again = beta_sweep(tiny_gpt2, run.intervention, run.test_ds, progress=False)
    pd.testing.assert_frame_equal(run.beta_sweep, again)  # the sweep the report used to rerun
    assert run.flip_beta == flip_beta(again) or (pd.isna(run.flip_beta) and pd.isna(flip_beta(again)))
    summary = run.write(tmp_path / "s")  # no model
    names = sorted(p.name for p in summary.parent.iterdir() if not p.name.startswith("."))  # atomic saves keep a hidden copy
    assert names == ["figures.html", "history.csv", "intervention", "summary.json"]
    assert read_metadata(tmp_path / "s" / "intervention")["model"] == fingerprint(tiny_gpt2)
    assert type(load_intervention(tmp_path / "s" / "intervention", tiny_gpt2)) is kind_class(method)
    assert json.loads(summary.read_text())["method"] == method
    assert "plotly" in (tmp_path / "s" / "figures.html").read_text()
    run.write(tmp_path / "m", tiny_gpt2)  # the old call still works


def test_unknown_method_names_the_choices(tiny_gpt2):
    with pytest.raises(ValueError, match="activ_scalar, steer_vec, dyn_scalar"):
        steer_task(tiny_gpt2, "ccc", "activscalar", n=8, config=CFG)


def test_pareto_run_writes_what_the_cli_wrote(tiny_gpt2, tmp_path):
    kw = dict(n=8, methods=["activ_scalar"], lambda_f=[0, 1], lambda_m=[0], margins=[1], epochs=1, progress=False)
    run = pareto_search(tiny_gpt2, "ccc", tmp_path / "p", **kw)
    assert isinstance(run, ParetoRun) and len(run.grid) == 2
    path = run.write(tmp_path / "p")
    s = json.loads(path.read_text())
    assert set(s) == {"task", "model", "study", "storage", "n_configs", "fronts", "rows"} and s["n_configs"] == 2
    assert set(s["fronts"]) == {"train_faithfulness", "train_minimality", "test_faithfulness", "test_minimality"}
    assert s["storage"].endswith("study.db") and s["study"].startswith("pareto-")
    assert len((tmp_path / "p" / "grid.jsonl").read_text().splitlines()) == 2
    assert pd.read_csv(tmp_path / "p" / "trials.csv").shape[0] == 2
    page = (tmp_path / "p" / "pareto.html").read_text()
    assert "<table" in page and "lambda_f" in page
    run.write(tmp_path / "elsewhere")  # another folder gets the JSONL too
    assert (tmp_path / "elsewhere" / "grid.jsonl").read_text() == (tmp_path / "p" / "grid.jsonl").read_text()
    rerun = pareto_search(tiny_gpt2, "ccc", tmp_path / "p", **kw)  # resumes: nothing new runs
    assert rerun.grid["key"].tolist() == run.grid["key"].tolist()


def test_faithfulness_is_metrics_kl(tiny_gpt2):
    torch.manual_seed(0)
    plus, minus, clean = (torch.randn(3, 11) for _ in range(3))
    log = lambda f: f.log_softmax(-1)
    kl = lambda p, q: (log(p).exp() * (log(p) - log(q))).sum(-1)
    assert torch.allclose(faithfulness(plus, minus, clean), -(kl(plus, clean) + kl(minus, clean)).mean(), atol=1e-6)
