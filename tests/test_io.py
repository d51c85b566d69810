import pytest

from mechsteer import _io


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    _io.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with _io.atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    d = tmp_path / "entry"
    with _io.atomic_dir(d) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with _io.atomic_dir(d) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("crash")
    assert (d / "a").read_text() == "1"
    with _io.atomic_dir(d) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in d.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_write_json_handles_tensors(tmp_path):
    import json

    import torch

    _io.write_json(tmp_path / "s.json", {"x": torch.tensor(1.5), "v": torch.arange(3)})
    assert json.loads((tmp_path / "s.json").read_text()) == {"x": 1.5, "v": [0, 1, 2]}
