"""run_fv end to end on a tiny model: shapes of per-task and global selections, rows of the
accuracy table and its intervals, the ICL protocol's prompts and held-out splits, the
instruction protocol's same-format evaluation, timing keys, and the written files."""

import json

import pytest

from mechsteer.fv import FVConfig, run_fv, top_heads
from mechsteer.fv.protocol import prepare_instruction
from mechsteer.sites import live_hooks

SMALL = dict(n_shots=3, n_train=8, n_queries=3, n_cie=2, n_val=2, n_test=4, k=3, filter=False, lrp_max_rank=10**6,
             progress=False)


@pytest.fixture(scope="module")
def run(request):
    from mechsteer.tiny import tiny_model

    model = tiny_model("llama")
    return model, run_fv(model, FVConfig(tasks=("capitalize", "antonym"), **SMALL))


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
        FVConfig(n_test=0)
    with pytest.raises(ValueError, match="protocol.*'few_shot'"):
        FVConfig(protocol="few_shot")
    with pytest.raises(ValueError, match="n_shots"):
        FVConfig(protocol="icl", n_shots=0)
    with pytest.raises(ValueError, match="n_val"):
        FVConfig(n_val=0)
    with pytest.raises(ValueError, match="sweep_step"):
        FVConfig(sweep_step=0)
    with pytest.raises(TypeError, match="n_train"):
        FVConfig(n_train=2.5)
    assert FVConfig.paper(tasks=("antonym",), n_test=60).n_test == 60  # preset, overridable


def test_icl_protocol_extracts_from_icl_prompts_and_evaluates_the_bare_query(run):
    _, r = run
    for d in r.tasks.values():
        assert d.protocol == "icl" and d.clean.style == "icl" and d.corrupted.style == "icl/corrupted"
        assert all(len(demos) == 3 for demos in d.clean.demo_positions)  # n_shots demonstrations
        # AttnLRP reads attention to the demonstration outputs (ICL prompts have no instruction)
        assert d.scored.frames == [sorted(q for dp in demos for q in dp) for demos in d.scored.demo_positions]
        for p in (d.val, d.test):  # zero-shot in the same format: the ICL query alone
            assert p.style == "icl" and p.meta["n_shots"] == 0
            assert p.texts == [f"Q: {x}\nA:" for x in p.inputs]
        assert d.clean.texts[0].endswith(f"Q: {d.clean.inputs[0]}\nA:")


def test_test_items_never_appear_in_extraction_or_validation(run):
    _, r = run
    for d in r.tasks.values():
        test = set(d.test.pairs)
        assert len(test) == len(d.test) == 4 and len(d.val) == 2
        used = set(d.val.pairs)
        for p in (d.clean, d.scored, d.corrupted):
            used |= set(p.pairs) | {j for demos in p.demo_pairs for j in demos}
        assert not test & used
        assert not set(d.test.inputs) & (set(d.val.inputs) | set(d.clean.inputs))
        assert used - set(d.val.pairs) <= set(d.splits["train"])  # extraction sees train pairs only


def test_accuracy_table_has_intervals(run):
    _, r = run
    for heads in ("global", "task"):
        for by_task in (False, True):
            t = r.accuracy_table(heads, by_task=by_task)
            assert {"n", "top1", "top1_lo", "top1_hi", "gain", "gain_lo", "gain_hi"} <= set(t.columns)
            assert ((t["top1_lo"] <= t["top1"] + 1e-12) & (t["top1"] <= t["top1_hi"] + 1e-12)).all()
            assert ((t["gain_lo"] <= t["gain"] + 1e-12) & (t["gain"] <= t["gain_hi"] + 1e-12)).all()
            base = t[t["name"] == "baseline"]
            assert (base["gain"] == 0).all()
    pooled = r.accuracy_table()
    assert (pooled["n"] == 8).all()  # 4 test items x 2 tasks
    assert {"n", "top1_lo", "top1_hi"} <= set(r.sweep.columns)
    base = r.summary()["accuracy"]["baseline"]
    assert base["n"] == 8 and isinstance(base["n"], int) and {"top1_lo", "gain_hi"} <= set(base)


def test_instruction_protocol_evaluates_in_its_own_format(tiny_gpt2, monkeypatch):
    cfg = FVConfig(protocol="instruction", style="instruction", **{**SMALL, "n_train": 10})
    d = prepare_instruction(tiny_gpt2, "antonym", [0, 1], "instruction", cfg)
    assert d.clean.style == "instruction" and d.val.style == "zero_shot" and d.test.style == "zero_shot"
    instruction = d.clean.meta["instruction_texts"][0]
    for p in (d.val, d.test):  # the instruction prompt minus its instruction
        assert p.texts == [f"{instruction}\nQ: {x}\nA:"[len(instruction):] for x in p.inputs]
    assert not set(d.test.pairs) & (set(d.clean.pairs) | set(d.val.pairs))
    from tests.test_fv_tasks import SMOL_TEMPLATE

    monkeypatch.setattr(tiny_gpt2.tokenizer, "chat_template", SMOL_TEMPLATE, raising=False)
    d = prepare_instruction(tiny_gpt2, "antonym", [0], "chat", cfg)
    assert d.val.style == "chat_zero_shot"
    bare = d.clean.texts[0].replace(instruction + "\n", "")  # the chat prompt minus its instruction
    x0 = d.clean.inputs[0]
    assert d.val.texts == [bare.replace(f"Q: {x0}", f"Q: {x}") for x in d.val.inputs]


def test_table1_like_for_like_in_the_run():
    """Every method is timed on the same naive_samples prompts at batch 1 and in one batch
    (fv.timing.table1); naive AIE on naive_layers=1 layer, its rate scaled to all layers; the
    summary's rates are the batched rows, the paper's procedure named "aie_naive"."""
    from mechsteer.tiny import tiny_model

    model = tiny_model("llama")
    cfg = FVConfig(tasks=("capitalize",), **{**SMALL, "n_queries": 2}, naive_layers=1, naive_samples=2, inject=("dfv",))
    run = run_fv(model, cfg)
    t, spm = run.extra["table1"], run.summary()["samples_per_minute"]
    assert sorted(set(t["batch_size"])) == [1, 2] and (t["n_prompts"] == 2).all()
    assert set(t["method"]) == {"naive", "fast", "lrp", "atp"} and set(spm) == {"aie_naive", "aie_fast", "lrp", "atp"}
    assert (t[t["method"] == "naive"]["timed_layers"] == 1).all()
    batched = t[t["batch_size"] == 2].set_index("method")["samples_per_minute"]
    assert spm["aie_naive"] == batched["naive"] and spm["lrp"] == batched["lrp"]
    with pytest.raises(ValueError, match="naive_layers"):
        FVConfig(naive_layers=0)
