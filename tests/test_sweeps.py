"""Pareto sweeps on Optuna studies: several workers, resuming, fingerprints, PostgreSQL.

The PostgreSQL test runs when ``MECHSTEER_TEST_PG_URL`` names a database
(``make postgres`` starts Debian's server and prints the URL; CI sets it).
"""

from __future__ import annotations

import os
import time
import uuid

import optuna
import pandas as pd
import pytest

from mechsteer.cli import main
from mechsteer.interventions import pareto, sweep
from mechsteer.interventions.pareto import TIMING, open_sweep, pareto_grid, read_results
from mechsteer.interventions.pareto_run import pareto_search
from mechsteer.tasks import ccc
from mechsteer.tiny import tiny_model

CLI = ["pareto", "--model", "tiny-llama", "--n", "8", "--epochs", "1", "--lambda-f", "0,1", "--lambda-m", "0",
       "--margins", "1", "--batch-size", "4"]
GRID = {"methods": ["activ_scalar"], "lambda_f": [0, 1, 10], "lambda_m": [0], "margins": [1], "epochs": 1,
        "batch_size": 4}


def _rows(path) -> pd.DataFrame:
    """trials.csv without the run facts (seconds, finished, trial, worker)."""
    return pd.read_csv(path).drop(columns=list(TIMING))


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("w1")
    assert main([*CLI, "--workers", "1", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def splits(tiny_gpt2):
    return ccc(tiny_gpt2, n=8).split()


@pytest.fixture(scope="module")
def reference(tiny_gpt2, splits, tmp_path_factory):
    return pareto_grid(tiny_gpt2, *splits, tmp_path_factory.mktemp("ref"), progress=False, **GRID)


def _count_train(monkeypatch) -> list[int]:
    calls, real = [], pareto.train

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pareto, "train", counting)
    return calls


def test_two_workers_write_the_rows_of_one(one_worker, tmp_path):
    out = tmp_path / "w2"
    assert main([*CLI, "--workers", "2", "--out", str(out)]) == 0
    two, one = pd.read_csv(out / "trials.csv"), pd.read_csv(one_worker / "trials.csv")
    assert len(two) == 4 and two["key"].is_unique and 1 <= two["worker"].nunique() <= 2
    pd.testing.assert_frame_equal(_rows(out / "trials.csv"), _rows(one_worker / "trials.csv"))
    cols = ["method", "lambda_f", "lambda_m", "margin", "seed", "train_effectiveness", "test_faithfulness",
            "train_minimality", "seconds"]
    assert set(cols) <= set(one.columns)
    assert (out / "study.db").exists() and (out / "pareto.html").exists()


def test_interrupted_sweep_resumes_without_repeating(tiny_gpt2, splits, reference, tmp_path, monkeypatch):
    calls = _count_train(monkeypatch)
    part = pareto_grid(tiny_gpt2, *splits, tmp_path, n_trials=2, progress=False, **GRID)  # stopped after 2
    assert len(part) == 2 and len(calls) == 2 and len(read_results(tmp_path)) == 2
    calls = _count_train(monkeypatch)
    df = pareto_grid(tiny_gpt2, *splits, tmp_path, progress=False, **GRID)
    assert len(calls) == 1  # only the third configuration ran
    pd.testing.assert_frame_equal(df.drop(columns=list(TIMING)), reference.drop(columns=list(TIMING)))


def test_trial_left_running_by_a_killed_worker_is_run_again(tiny_gpt2, splits, reference, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "HEARTBEAT_S", 0.2)
    monkeypatch.setattr(sweep, "GRACE_S", 1.0)
    search = open_sweep(tiny_gpt2, *splits, tmp_path, **GRID)
    with sweep.quiet_optuna(), pytest.warns(UserWarning, match="Heartbeat"):
        killed = search.sweep.study.ask()  # a worker took a grid point, then died: RUNNING, no row
    search.sweep.study._storage.record_heartbeat(killed._trial_id)
    calls = _count_train(monkeypatch)
    start = time.perf_counter()
    df = pareto_grid(tiny_gpt2, *splits, tmp_path, progress=False, **GRID)  # waits for it to go stale, reruns it
    assert len(calls) == 3 and time.perf_counter() - start >= 1.0
    states = {t.number: t.state for t in search.sweep.study.get_trials()}
    assert states[killed.number] == optuna.trial.TrialState.FAIL
    assert optuna.trial.TrialState.RUNNING not in states.values()
    pd.testing.assert_frame_equal(df.drop(columns=list(TIMING)), reference.drop(columns=list(TIMING)))


def test_another_model_cannot_join_the_study(tiny_gpt2, splits, tmp_path):
    kw = {**GRID, "study": "s"}
    open_sweep(tiny_gpt2, *splits, tmp_path, **kw)
    other = tiny_model("gpt2", seed=1)  # same architecture, other weights
    with pytest.raises(ValueError, match=r"Study 's' holds a sweep with other model weights or data \(model: study '"):
        open_sweep(other, *ccc(other, n=8).split(), tmp_path, **kw)
    with pytest.raises(ValueError, match=r"holds a sweep with other settings \(epochs: study 1, this worker 2"):
        open_sweep(tiny_gpt2, *splits, tmp_path, **{**kw, "epochs": 2})


def test_worker_process_with_another_model_is_a_clear_error(tiny_gpt2, tmp_path):
    kw = {**GRID, "lambda_f": [0]}
    with pytest.raises(ValueError, match="1 of 1 worker processes could not join the study: ValueError: Study"):
        pareto_search(tiny_gpt2, "ccc", tmp_path, n=8, workers=2, model_name="tiny-llama", progress=False, **kw)
    with pytest.raises(ValueError, match="workers=2 needs model_name="):
        pareto_search(tiny_gpt2, "ccc", tmp_path, n=8, workers=2, progress=False, **kw)


def test_nsga2_samples_the_same_values(tiny_gpt2, splits, tmp_path):
    kw = {**GRID, "lambda_m": [0, 1], "sampler": "nsga2"}
    with pytest.raises(ValueError, match="needs n_trials="):
        pareto_grid(tiny_gpt2, *splits, tmp_path, **kw)
    df = pareto_grid(tiny_gpt2, *splits, tmp_path, n_trials=3, progress=False, **kw)
    assert 1 <= len(df) <= 3 and df["key"].is_unique
    assert set(df["lambda_f"]) <= {0.0, 1.0, 10.0} and set(df["lambda_m"]) <= {0.0, 1.0}


@pytest.mark.skipif(not os.environ.get("MECHSTEER_TEST_PG_URL"), reason="set MECHSTEER_TEST_PG_URL (make postgres)")
def test_two_workers_on_postgresql(one_worker, tmp_path):
    url, name = os.environ["MECHSTEER_TEST_PG_URL"], f"test-{uuid.uuid4().hex[:8]}"
    try:
        assert main([*CLI, "--workers", "2", "--storage", url, "--study", name, "--out", str(tmp_path)]) == 0
        pd.testing.assert_frame_equal(_rows(tmp_path / "trials.csv"), _rows(one_worker / "trials.csv"))
        assert not (tmp_path / "study.db").exists()
        trials = optuna.load_study(study_name=name, storage=url).get_trials()
        assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 4
    finally:
        optuna.delete_study(study_name=name, storage=url)
