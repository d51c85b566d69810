"""`--data FILE` on the command line and `make_task(path)`: a user's records wherever a task name goes."""

import json
from pathlib import Path

import pytest

from mechsteer.cli import main
from mechsteer.tasks import make_task

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my_prompts.jsonl"

RECORDS = [
    {"prompt": "When Anne met Tom, Tom gave the book to", "corrupted": "When Anne met Tom, Anne gave the book to",
     "correct": " Anne", "wrong": " Tom", "positions": {"IO": "Anne", "S1": "Tom"}},
    {"prompt": "In Paris people speak", "corrupted": "In Berlin people speak", "correct": " French", "wrong": " German"},
    {"prompt": "The sky is", "corrupted": "The sea is", "correct": " blue", "wrong": " green"},
]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def test_make_task_reads_a_file_in_order(tiny_llama, data_file):
    ds = make_task(data_file, tiny_llama, n=None)
    assert ds.name == "mine"
    kept = [r["prompt"] for r in RECORDS if r["prompt"] in ds.prompts]
    assert ds.prompts == kept and len(ds) >= 2
    assert make_task(str(data_file), tiny_llama, n=None).prompts == ds.prompts
    with pytest.raises(FileNotFoundError, match="not found"):
        make_task("missing.jsonl", tiny_llama)
    with pytest.raises(ValueError, match="Unknown task"):
        make_task("cc", tiny_llama)


def test_cli_tasks_and_attribute_take_data(data_file, tmp_path, capsys):
    assert main(["tasks", "--data", str(data_file), "--model", "tiny-llama", "--show", "2"]) == 0
    assert "mine:" in capsys.readouterr().out
    out = tmp_path / "att"
    assert main(["attribute", "--data", str(data_file), "--model", "tiny-llama", "--methods", "atp,dla",
                 "--out", str(out)]) == 0
    assert (out / "scores.csv").read_text().splitlines()[1].startswith("mine,")
    assert (out / "index.html").is_file()


@pytest.mark.parametrize("argv, message", [
    (["tasks", "--data", "nope.jsonl"], "no such file"),
    (["tasks", "--data", "README.md"], "expected a .jsonl, .json or .csv"),
    (["tasks", "--task", "ccc", "--data", str(EXAMPLE)], "not allowed with"),
    (["tasks"], "one of the arguments --task --data is required"),
])
def test_cli_data_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_steer_and_pareto_take_data(data_file, tmp_path):
    """Mixed-length records train and test (named / end-relative slots), also in a sweep."""
    out = tmp_path / "steer"
    assert main(["steer", "--data", str(data_file), "--model", "tiny-llama", "--epochs", "1", "--out", str(out)]) == 0
    assert (out / "summary.json").is_file()
    par = tmp_path / "pareto"
    assert main(["pareto", "--data", str(data_file), "--model", "tiny-llama", "--methods", "activ_scalar",
                 "--lambda-f", "0", "--lambda-m", "0", "--margins", "1", "--epochs", "1", "--out", str(par)]) == 0
    rows = (par / "trials.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("activ_scalar,")
