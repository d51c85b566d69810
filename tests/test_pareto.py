"""Pareto search (Sec. 4.2, Fig. 2): the grid on its study, resuming, fronts and the figure."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from mechsteer.interventions import pareto
from mechsteer.interventions.pareto import (
    config_key,
    dataset_id,
    pareto_figure,
    pareto_front,
    pareto_grid,
    read_results,
)
from mechsteer.tasks import ccc

GRID = {"methods": ["activ_scalar"], "lambda_f": [0, 1], "lambda_m": [0], "margins": [1], "epochs": 1, "batch_size": 4, "progress": False}


@pytest.fixture(scope="module")
def splits(tiny_gpt2):
    return ccc(tiny_gpt2, n=8).split()


@pytest.fixture(scope="module")
def reference(tiny_gpt2, splits, tmp_path_factory):
    return pareto_grid(tiny_gpt2, *splits, tmp_path_factory.mktemp("ref"), **GRID)


def _count_train(monkeypatch, fail_at: int | None = None) -> list[int]:
    calls = []
    real = pareto.train

    def counting(*args, **kwargs):
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(pareto, "train", counting)
    return calls


def _same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    cols = [c for c in a.columns if c not in pareto.TIMING]
    pd.testing.assert_frame_equal(a[cols].reset_index(drop=True), b[cols].reset_index(drop=True))


def test_rows_and_columns(reference):
    df = reference
    assert len(df) == 2 and df["lambda_f"].tolist() == [0.0, 1.0]
    assert df["key"].is_unique and (df["method"] == "activ_scalar").all()
    for split in ("train", "test"):
        assert (df[f"{split}_effectiveness"] <= 0).all() and (df[f"{split}_faithfulness"] <= 1e-6).all()
        assert df[f"{split}_minimality"].dtype.kind == "i"
    assert (df["n_params"] > 0).all() and (df["seconds"] > 0).all() and df["lr"].tolist() == [1e-3, 1e-3]
    assert df["trial"].tolist() != [None, None] and df["worker"].str.contains(":").all()


def test_resume_after_kill_in_second_config(tiny_gpt2, splits, reference, tmp_path, monkeypatch):
    path = tmp_path / "sweep"
    _count_train(monkeypatch, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        pareto_grid(tiny_gpt2, *splits, path, **GRID)
    assert len(read_results(path)) == 1  # the first config was stored at once (its trial is COMPLETE)
    calls = _count_train(monkeypatch)
    df = pareto_grid(tiny_gpt2, *splits, path, **GRID)
    assert len(calls) == 1  # only the missing config ran
    _same_rows(df, reference)
    calls = _count_train(monkeypatch)
    _same_rows(pareto_grid(tiny_gpt2, *splits, path, **GRID), reference)
    assert calls == []


def test_old_grid_jsonl_is_read_back_and_its_partial_line_rerun(tiny_gpt2, splits, reference, tmp_path, monkeypatch):
    path = tmp_path / "sweep"
    path.mkdir()
    text = "".join(json.dumps({k: v for k, v in r.items() if k not in pareto.TIMING[1:]}) + "\n"
                   for r in reference.to_dict(orient="records"))
    (path / "grid.jsonl").write_text(text[: len(text) - 40])  # mechsteer 0.3's log, cut in its second line
    with pytest.warns(UserWarning, match="partial line"):
        assert len(read_results(path / "grid.jsonl")) == 1
    calls = _count_train(monkeypatch)
    with pytest.warns(UserWarning, match="partial line"):
        df = pareto_grid(tiny_gpt2, *splits, path, **GRID)
    assert len(calls) == 1  # the old log's complete row was read back
    _same_rows(df, reference)
    assert len(read_results(path / "trials.csv")) == 2


def _row(key: str = "a", **changes) -> dict:
    """A row of the shape pareto_grid writes (measures made up)."""
    row = {"key": key, "method": "activ_scalar", "lambda_f": 0.0, "lambda_m": 0.0, "margin": 1.0, "seed": 0,
           "n_params": 8, "lr": 1e-3, "error": None, "final_psi": -0.5, "seconds": 0.1}
    row |= {f"{s}_{m}": None if m == "n_locations" else -0.5 for s in ("train", "test") for m in pareto.MEASURES}
    return row | changes


def _lines(*lines) -> str:
    """JSONL text: dicts / lists as JSON, strings as they are, each ending with a newline."""
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)


def test_broken_middle_line_raises(tiny_gpt2, splits, tmp_path):
    path = tmp_path / "grid.jsonl"
    path.write_text(_lines(_row("a"), "not json", _row("b")))
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        pareto_grid(tiny_gpt2, *splits, tmp_path, **GRID)  # an old log in the folder is read back
    with pytest.raises(ValueError, match="is a file; pareto_grid writes a folder"):
        pareto_grid(tiny_gpt2, *splits, path, **GRID)
    path.write_bytes(json.dumps(_row("a")).encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_results(path)


def _without(key):
    row = _row("b")
    del row[key]
    return row


@pytest.mark.parametrize(
    "line, problem",
    [
        ({}, r"lacks the fields \['key', 'method', 'lambda_f'"),
        ([1, 2], r"is a JSON array \(\[1, 2\]\), not a pareto_grid row \(an object\)"),
        ("null", r"is a JSON null \(null\), not a pareto_grid row"),
        ("3.5", r"is a JSON number \(3.5\)"),
        ('"key"', r"is a JSON string \(\"key\"\)"),
        (_without("key"), r"lacks the fields \['key'\]"),
        (_without("test_effectiveness"), r"lacks the fields \['test_effectiveness'\]"),
        (_row(key=7), r"'key' must be a non-empty string, got 7"),
        (_row(key=""), r"'key' must be a non-empty string, got ''"),
        (_row("b", test_effectiveness="high"), r"'test_effectiveness' must be a number or null, got 'high'"),
        (_row("b", train_minimality=[3]), r"'train_minimality' must be a number or null, got \[3\]"),
        (_row("b", train_faithfulness=True), r"'train_faithfulness' must be a number or null, got True"),
        (_row("b", lambda_f=None), r"'lambda_f' must be a number, got None"),
        (_row("b", seconds="1s"), r"'seconds' must be a number or null, got '1s'"),
    ],
    ids=["empty", "array", "null", "number", "string", "no-key", "no-measure", "int-key", "empty-key",
         "text-measure", "list-measure", "bool-measure", "null-lambda", "text-seconds"],
)
def test_line_of_wrong_shape_is_named(tmp_path, line, problem):
    path = tmp_path / "grid.jsonl"
    path.write_text(_lines(_row("a"), line, _row("c")))
    with pytest.raises(ValueError, match=rf"grid.jsonl, line 2:? {problem}.*delete that line to resume"):
        read_results(path)
    path.write_text(_lines(_row("a"), line))  # a complete last line is checked too
    with pytest.raises(ValueError, match=rf"line 2:? {problem}"):
        read_results(path)


def test_torn_last_line_of_any_shape_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "grid.jsonl"
    path.write_text(_lines(_row("a"), _row("b", test_effectiveness=None)) + "{}")  # no newline: an interrupted write
    with pytest.warns(UserWarning, match="partial line"):
        df = read_results(path)
    assert df["key"].tolist() == ["a", "b"] and pd.isna(df["test_effectiveness"].iloc[1])


def test_keys_follow_what_determines_a_result(tiny_gpt2, splits, tmp_path, monkeypatch):
    train_ds, test_ds = splits
    assert dataset_id(train_ds) == dataset_id(train_ds.subset(slice(None)))
    assert dataset_id(train_ds) != dataset_id(test_ds)
    spec = {"method": "activ_scalar", "lambda_f": 1.0, "epochs": 1}
    assert config_key(spec) == config_key(dict(reversed(spec.items())))
    assert config_key(spec) != config_key({**spec, "epochs": 2})
    path = tmp_path / "sweep"
    kw = {**GRID, "lambda_f": [0]}
    pareto_grid(tiny_gpt2, train_ds, test_ds, path, **kw)
    calls = _count_train(monkeypatch)
    pareto_grid(tiny_gpt2, train_ds, test_ds, path, **{**kw, "epochs": 2})
    pareto_grid(tiny_gpt2, train_ds, test_ds, path, **{**kw, "seeds": [1]})
    assert len(calls) == 2 and len(read_results(path)) == 3  # three studies in one study.db
    calls = _count_train(monkeypatch)
    pareto_grid(tiny_gpt2, train_ds, test_ds, path, **{**kw, "lambda_f": [0, 1]})  # another grid: a new study
    assert len(calls) == 1  # lambda_F = 0 is read back from the first study


def test_all_methods_run(tiny_gpt2, splits, tmp_path):
    kw = {**GRID, "methods": ["steer_vec", "dyn_scalar"], "lambda_f": [1], "sites": ["mlp_out"]}
    df = pareto_grid(tiny_gpt2, *splits, tmp_path / "g", **kw)
    assert df["method"].tolist() == ["steer_vec", "dyn_scalar"]
    assert df["lr"].tolist() == [1e-4, 1e-3]
    assert df["train_n_locations"].iloc[0] >= 0 and pd.isna(df["train_n_locations"].iloc[1])
    assert df["n_params"].tolist() == [2 * splits[0].n_pos * 64, 2 * 64]


@pytest.mark.parametrize(
    "bad, error, message",
    [
        ({"methods": ["actv_scalar"]}, ValueError, "methods"),
        ({"lambda_m": [-1]}, ValueError, r"lambda_m must be a non-empty list of finite numbers >= 0, got \[-1\]"),
        ({"margins": []}, ValueError, "margins must be a non-empty list"),
        ({"lambda_f": [0, True]}, TypeError, r"lambda_f\[1\] must be a finite number, got True"),
        ({"lambda_f": [float("nan")]}, ValueError, r"lambda_f\[0\] must be a finite number, got nan"),
        ({"epochs": 0}, ValueError, "epochs must be a positive integer, got 0"),
        ({"epochs": True}, TypeError, "epochs must be a positive integer, got True"),
        ({"batch_size": 2.5}, TypeError, "batch_size"),  # (tests type-check annotations first: message differs)
        ({"seeds": []}, ValueError, "seeds must be a non-empty list of integers >= 0, got"),
        ({"seeds": [0, 1.5]}, TypeError, "seeds"),  # (idem)
        ({"seeds": [False]}, TypeError, r"seeds\[0\] must be a non-negative integer, got False"),
        ({"layers": [0, -1]}, ValueError, r"layers\[1\] must be a non-negative integer, got -1"),
        ({"lr": float("inf")}, ValueError, "lr must be a finite number, got inf"),
        ({"init_std": -0.1}, ValueError, "init_std must be a finite number >= 0, got -0.1"),
    ],
)
def test_bad_arguments(tiny_gpt2, splits, tmp_path, bad, error, message):
    with pytest.raises(error, match=message):
        pareto_grid(tiny_gpt2, *splits, tmp_path / "g.jsonl", **{**GRID, **bad})
    assert not (tmp_path / "g.jsonl").exists()


def test_front_on_hand_made_points():
    df = pd.DataFrame({
        "E": [-1.0, -0.5, 0.0, -0.6, -0.5, float("nan")],
        "F": [0.0, -0.2, -1.0, -0.3, -0.2, 0.5],
        "test_minimality": [5, 3, 10, 1, 3, 0],
    })
    assert pareto_front(df, "F", "E").index.tolist() == [2, 1, 4, 0]  # ties kept, NaN dropped, sorted by x
    # minimality is minimised: 3 (fewest), 1/4 (better E at 3), 2 (best E)
    assert pareto_front(df, "test_minimality", "E").index.tolist() == [3, 1, 4, 2]
    assert pareto_front(df, "test_minimality", "E", minimize=[]).index.tolist() == [2]
    with pytest.raises(ValueError, match="not in the table"):
        pareto_front(df, "G", "E")


def _table() -> pd.DataFrame:
    rows = []
    for i, m in enumerate(["activ_scalar", "steer_vec"] * 3):
        row = {"method": m, "lambda_f": float(i), "lambda_m": 0.0, "margin": 1.0, "seed": 0, "n_params": 8 + i}
        for s in ("train", "test"):
            row |= {f"{s}_effectiveness": -i / 3, f"{s}_faithfulness": -math.sqrt(6 - i), f"{s}_minimality": i}
        rows.append(row)
    return pd.DataFrame(rows)


def test_figure_traces():
    fig = pareto_figure(_table())
    names = [t.name for t in fig.data]
    assert names == ["ActivScalar", "SteerVec", "Pareto front"] * 4  # 2 splits x 2 trade-offs
    assert [t.showlegend for t in fig.data[:3]] == [True] * 3 and not any(t.showlegend for t in fig.data[3:])
    assert [t.marker.symbol for t in fig.data[0::3]] == ["x", "x", "circle", "circle"]  # train, train, test, test
    assert "lambda_f" in fig.data[0].hovertemplate and fig.data[0].customdata.shape == (3, 5)
    front = fig.data[2]
    assert list(front.x) == sorted(front.x) and len(front.x) >= 1
    assert len(pareto_figure(_table(), per_method=True).data) == 4 * 4
    with pytest.raises(ValueError, match="lacks columns"):
        pareto_figure(_table().drop(columns="lambda_m"))


def test_diverged_config_is_recorded_not_rerun(tiny_gpt2, splits, tmp_path, monkeypatch):
    real = pareto.train

    def diverge_without_faithfulness(model, iv, ds, cfg):
        if cfg.lambda_f == 0:
            raise FloatingPointError("Loss -Psi is nan at epoch 0, step 0")
        return real(model, iv, ds, cfg)

    monkeypatch.setattr(pareto, "train", diverge_without_faithfulness)
    path = tmp_path / "sweep"
    with pytest.warns(UserWarning, match="diverged"):
        df = pareto_grid(tiny_gpt2, *splits, path, **{**GRID, "sites": "mlp_out"})
    assert df["error"].iloc[0].startswith("Loss -Psi is nan") and pd.isna(df["error"].iloc[1])
    assert pd.isna(df["test_effectiveness"].iloc[0]) and df["sites"].iloc[1] == ["mlp_out"]
    assert pareto_front(df, "test_faithfulness", "test_effectiveness").index.tolist() == [1]
    calls = _count_train(monkeypatch)
    pareto_grid(tiny_gpt2, *splits, path, **{**GRID, "sites": "mlp_out"})
    assert calls == []
