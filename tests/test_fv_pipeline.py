"""run_fv end to end on a tiny model: shapes of per-task and global selections, rows of the
accuracy table, timing keys, and the written files."""

import json

import pytest

from mechsteer.fv import FVConfig, run_fv, top_heads
from mechsteer.sites import live_hooks


@pytest.fixture(scope="module")
def run(request):
    from mechsteer.tiny import tiny_model

    model = tiny_model("llama")
    cfg = FVConfig(tasks=("capitalize", "antonym"), n_instructions=2, n_queries=3, n_cie=2, n_test=4, k=3, pool=4,
                   filter=False, lrp_max_rank=10**6, progress=False)
    return model, run_fv(model, cfg)


def test_per_task_and_global_selections_have_the_documented_shapes(run):
    model, r = run
    shape = (model.cfg.n_layers, model.cfg.n_heads)
    for method in ("aie", "lrp", "atp"):
        assert set(r.scores[method]) == {"capitalize", "antonym"}
        for res in r.scores[method].values():
            assert res.axes == ("layer", "head") and tuple(res.scores.shape) == shape
        g = r.global_scores[method]
        assert tuple(g.scores.shape) == shape
        mean = sum(res.scores for res in r.scores[method].values()) / 2
        assert (g.scores - mean).abs().max() < 1e-6  # global = mean over tasks
        assert r.heads[method] == top_heads(g, 3) and len(r.heads[method]) == 3
    assert set(r.mean_z) == {"capitalize", "antonym"}
    assert tuple(r.mean_z["antonym"].shape) == (*shape, model.cfg.d_head)


def test_accuracy_rows_timing_and_files(run, tmp_path):
    model, r = run
    names = set(r.accuracy["name"])
    assert names == {"baseline"} | {f"{i}/{m}" for i in ("fv", "dfv") for m in ("aie", "lrp", "atp")}
    assert set(r.accuracy["heads"]) == {"none", "global", "task"}
    assert set(r.fv_layer) == {"aie", "lrp", "atp"}
    assert all(v > 0 for v in r.samples_per_minute.values())
    path = r.write(tmp_path / "out")
    assert json.loads(path.read_text())["tasks"] == ["capitalize", "antonym"]
    written = {p.name for p in path.parent.iterdir()}
    assert {"accuracy.csv", "instructions.csv", "layer_sweep.csv", "head_scores.csv", "head_agreement.csv",
            "example.csv", "figures.html", "summary.json"} <= written
    page = (path.parent / "figures.html").read_text()
    assert page.count('<div class="fig">') == len(r.figures()) == 3
    assert live_hooks(model) == []


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="select"):
        FVConfig(select=("shap",))
    with pytest.raises(ValueError, match="n_test"):
        FVConfig(n_test=1)


def test_naive_aie_timed_on_some_layers_is_scaled_to_all(monkeypatch):
    """naive_layers=1 times naive AIE on layer 0 alone (one forward per head) and reports the
    rate of all layers: the timed run's rate divided by n_layers."""
    import mechsteer.fv.pipeline as pipeline
    from mechsteer.tiny import tiny_model

    model, seen = tiny_model("llama"), []
    real_aie = pipeline.aie

    def spy(*args, **kwargs):
        out = real_aie(*args, **kwargs)
        if kwargs.get("mode") == "naive":
            seen.append((kwargs["layers"], out.meta["samples_per_minute"]))
        return out

    monkeypatch.setattr(pipeline, "aie", spy)
    cfg = FVConfig(tasks=("capitalize",), n_instructions=1, n_queries=2, n_cie=2, n_test=4, k=3, pool=4,
                   filter=False, lrp_max_rank=10**6, progress=False, naive_layers=1, select=("aie",), inject=("dfv",))
    spm = run_fv(model, cfg).summary()["samples_per_minute"]["aie_naive"]
    (layers, timed_rate), = seen
    assert layers == [0] and spm == pytest.approx(timed_rate / model.cfg.n_layers)
    with pytest.raises(ValueError, match="naive_layers"):
        FVConfig(naive_layers=0)
