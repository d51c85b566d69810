import json
import re

import pytest

from mechsteer.cli import main
from mechsteer.report import Report, Section, model_section, task_section
from mechsteer.tasks import ccc, ioi


def test_report_is_offline_and_has_a_summary(tiny_gpt2, tmp_path):
    report = Report("t")
    report.add(model_section(tiny_gpt2))
    report.add(task_section(tiny_gpt2, [ccc(tiny_gpt2, n=4), ioi(tiny_gpt2, n=4)]))
    page = report.write(tmp_path).read_text()
    assert not re.search(r"<script[^>]*\bsrc=", page), "plotly.js must be inlined, not fetched"
    assert page.count("Plotly.newPlot") >= 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"]["n_layers"] == 2
    assert summary["model"]["fingerprint"]["weights_sha256"]
    assert set(summary["tasks"]) == {"ccc", "ioi"}
    assert summary["tasks"]["ioi"]["n"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", "summary.json"]


def test_section_keys_are_unique():
    report = Report()
    report.add(Section("a", "A"))
    with pytest.raises(ValueError, match="already has a section 'a'"):
        report.add(Section("a", "again"))


def test_cli_info(capsys):
    assert main(["info", "--model", "tiny-llama"]) == 0
    out = capsys.readouterr().out
    assert "n_layers" in out and "blocks.{layer}.hook_attn_out" in out
    assert main(["info", "--model", "tiny-gpt2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_heads"] == 4


def test_cli_tasks(capsys):
    assert main(["tasks", "--task", "ioi", "--n", "5", "--model", "tiny-gpt2"]) == 0
    out = capsys.readouterr().out
    assert "ioi: 5 prompts of" in out and "dropped" in out


def test_cli_demo_writes_the_report(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "d"), "--n", "4", "--model", "tiny-llama"]) == 0
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert {"model", "tasks", "attribution", "steering"} <= set(summary)
    assert set(summary["steering"]) == {"activ_scalar", "steer_vec", "dyn_scalar"}
    assert (tmp_path / "d" / "index.html").stat().st_size > 1_000_000  # plotly.js inlined


@pytest.mark.parametrize("method", ["activ_scalar", "steer_vec", "dyn_scalar"])
def test_cli_steer_writes_intervention_figures_and_summary(tmp_path, method):
    from mechsteer.interventions import load_intervention
    from mechsteer.models import load_model

    out = tmp_path / "s"
    args = ["steer", "--task", "ccc", "--method", method, "--sites", "attn_out,mlp_out", "--n", "8", "--epochs", "2"]
    assert main(args + ["--model", "tiny-llama", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["n_params"] > 0
    for split in ("train", "test"):
        assert {"effectiveness", "faithfulness", "minimality"} <= set(summary[split])
        assert summary[split]["effectiveness"] <= 0 and summary[split]["faithfulness"] <= 1e-6
    iv = load_intervention(out / "intervention", load_model("tiny-llama"))
    assert iv.n_params == summary["n_params"]
    assert (out / "figures.html").exists() and (out / "history.csv").exists()


def test_cli_steer_unknown_method_fails_before_loading(capsys):
    assert main(["steer", "--method", "activscalar", "--out", "/nonexistent/x"]) == 2
    assert "activ_scalar" in capsys.readouterr().err


def test_cli_bad_input_is_a_clear_error(capsys):
    assert main(["tasks", "--task", "sst2"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_pareto_resumes(tmp_path):
    out = tmp_path / "p"
    base = ["pareto", "--model", "tiny-llama", "--n", "8", "--epochs", "1", "--lambda-m", "0", "--margins", "1", "--out", str(out)]
    assert main(base + ["--lambda-f", "0,1"]) == 0
    first = (out / "grid.jsonl").read_text().splitlines()
    assert len(first) == 4  # 2 methods x 2 lambda_F
    assert main(base + ["--lambda-f", "0,1,10"]) == 0
    lines = (out / "grid.jsonl").read_text().splitlines()
    assert lines[:4] == first and len(lines) == 6  # only the new configurations ran
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_configs"] == 6 and set(summary["fronts"]) == {
        "train_faithfulness", "train_minimality", "test_faithfulness", "test_minimality"}


def test_cli_fv_writes_accuracy_timing_and_heads(tmp_path):
    out = tmp_path / "fv"
    args = ["fv", "--model", "tiny-llama", "--tasks", "capitalize,antonym", "--select", "aie,lrp,atp", "--inject", "fv,dfv",
            "--k", "3", "--n-shots", "3", "--n-train", "8", "--n-val", "2", "--n-queries", "3", "--n-cie", "2",
            "--n-test", "4", "--naive-samples", "2",
            "--no-filter", "--lrp-max-rank", "100000", "--out", str(out)]
    assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s["samples_per_minute"]) == {"aie_naive", "aie_fast", "lrp", "atp"}
    assert "baseline" in s["accuracy"]
    for inj in ("fv", "dfv"):
        assert set(s["accuracy"][inj]) == {"aie", "lrp", "atp"}
        assert {"top1", "top3"} <= set(s["accuracy"][inj]["lrp"])
    assert all(len(heads) == 3 for heads in s["top_heads"].values())
    assert {r["batch_size"] for r in s["table1"]} == {1, 2}  # Table 1: batch 1 and batched, same prompts
    for f in ("figures.html", "accuracy.csv", "head_scores.csv", "layer_sweep.csv", "table1.csv"):
        assert (out / f).exists()


def test_demo_sizes_quick_and_full(tmp_path):
    from mechsteer.demo import DemoConfig

    quick, full = DemoConfig(), DemoConfig.full()
    assert (quick.size, full.size) == ("quick", "full")
    assert quick.attribution_n < full.attribution_n and quick.steer_epochs < full.steer_epochs
    from mechsteer.demo import DEMO_FV_TASKS
    from mechsteer.fv.pipeline import PAPER_TASKS, FVConfig

    assert quick.fv["n_test"] < FVConfig.paper().n_test and full.fv == {}  # full: the paper preset as it is
    assert DEMO_FV_TASKS == PAPER_TASKS  # the demo shows the tasks where FVs work on SmolLM2
    assert DemoConfig.full(attribution_n=0).attribution_n == 0  # options override the preset
    with pytest.raises(ValueError, match="steer_epochs"):
        DemoConfig(steer_epochs=0)
    out = tmp_path / "f"
    args = ["demo", "--full", "--n", "4", "--attribution-n", "0", "--steer-n", "0", "--fv-tasks", "", "--model", "tiny-llama"]
    assert main(args + ["--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["demo"]["size"] == "full" and summary["meta"]["demo"]["attribution_n"] == 0
    assert {"model", "tasks"} <= set(summary) and "steering" not in summary
    assert summary["replication"]["counts"] and len(summary["replication"]["claims"]) >= 12  # --full adds it
    assert not quick.replicate and full.replicate
