import os
import shutil
import time

import pytest

from mechsteer import _io

OLD = {"a": "old", "only_old": "1"}
NEW = {"a": "new", "only_new": "2"}


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    _io.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with _io.atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def _names(folder):
    """Entries of ``folder`` other than the hidden targets of its links."""
    live = {os.readlink(p) for p in folder.iterdir() if p.is_symlink()}
    return sorted(p.name for p in folder.iterdir() if p.name not in live)


def _content(d):
    """Files of directory ``d`` as {name: text}; None when nothing is at ``d``."""
    if not d.is_dir():
        assert not os.path.lexists(d), f"{d} is neither a directory nor absent"
        return None
    return {p.name: p.read_text() for p in d.iterdir()}


def _write(d, files):
    with _io.atomic_dir(d) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


def _make(d, state):
    """An entry ``d`` holding OLD as a link (written by atomic_dir), a real directory, or absent."""
    if state == "link":
        _write(d, OLD)
    elif state == "real":  # as written by mechsteer before links
        d.mkdir(parents=True)
        for name, text in OLD.items():
            (d / name).write_text(text)
    else:
        d.parent.mkdir(parents=True, exist_ok=True)


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    d = tmp_path / "entry"
    _write(d, {"a": "1"})
    with pytest.raises(RuntimeError):
        with _io.atomic_dir(d) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("crash")
    assert _content(d) == {"a": "1"}
    _write(d, {"b": "3"})
    assert _content(d) == {"b": "3"}
    assert _names(tmp_path) == ["entry"]  # the link and its one target, nothing else
    assert len(list(tmp_path.iterdir())) == 2


FUNCS = {"replace": (os, "replace"), "rmtree": (shutil, "rmtree"), "symlink": (os, "symlink"), "unlink": (os, "unlink")}


@pytest.mark.parametrize("state", ["link", "real", "absent"])
@pytest.mark.parametrize("func", sorted(FUNCS))
@pytest.mark.parametrize("when", ["before", "after"])
def test_interrupt_at_each_step_leaves_old_or_new(tmp_path, monkeypatch, state, func, when):
    """KeyboardInterrupt at the n-th call of os.replace / shutil.rmtree / ... (before or after
    the real call runs): the entry then holds all of OLD or all of NEW, never nothing."""
    module, name = FUNCS[func]
    real = getattr(module, name)
    interrupted = 0
    for n in range(1, 8):
        d = tmp_path / f"{n}" / "entry"
        _make(d, state)
        calls = []

        def flaky(*args, n=n, **kwargs):
            calls.append(args)
            if len(calls) == n and when == "before":
                raise KeyboardInterrupt(f"{name} call {n}")
            out = real(*args, **kwargs)
            if len(calls) == n:
                raise KeyboardInterrupt(f"{name} call {n}")
            return out

        monkeypatch.setattr(module, name, flaky)
        try:
            _write(d, NEW)
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            monkeypatch.setattr(module, name, real)
        assert _content(d) in ((None if state == "absent" else OLD), NEW), (n, calls)
        if len(calls) < n:  # ran to the end without reaching call n
            assert _content(d) == NEW
            break
        monkeypatch.setattr(_io, "STALE_AFTER_S", 0.0)  # a later write clears every leftover
        _write(d, {"later": "3"})
        monkeypatch.undo()
        assert _content(d) == {"later": "3"} and _names(d.parent) == ["entry"]
        assert len(list(d.parent.iterdir())) == 2
    assert interrupted >= (1 if func in ("replace", "symlink") or state == "link" else 0)


@pytest.mark.parametrize("state", ["link", "absent"])
def test_every_instant_shows_old_or_new(tmp_path, monkeypatch, state):
    """Seen between every file-system step of a write, the entry is all OLD or all NEW."""
    d = tmp_path / "entry"
    _make(d, state)
    seen = []
    for module, name in FUNCS.values():
        real = getattr(module, name)

        def watch(*args, real=real, **kwargs):
            seen.append(_content(d))
            out = real(*args, **kwargs)
            seen.append(_content(d))
            return out

        monkeypatch.setattr(module, name, watch)
    _write(d, NEW)
    monkeypatch.undo()
    assert len(seen) >= 4 and all(s in (OLD if state == "link" else None, NEW) for s in seen)
    assert seen[-1] == NEW and _content(d) == NEW


def test_stale_leftovers_are_cleaned_young_and_foreign_kept(tmp_path):
    d = tmp_path / "entry"
    _write(d, OLD)
    stale = [tmp_path / ".entry.0123456789ab.dir", tmp_path / ".entry.abcdefgh.tmp", tmp_path / ".entry.old.42"]
    young = tmp_path / ".entry.ba9876543210.dir"  # maybe another writer still at work
    foreign = [tmp_path / ".entry.notes", tmp_path / ".other.0123456789ab.dir"]
    for p in stale + [young] + foreign:
        p.mkdir()
        (p / "x").write_text("x")
    hour_ago = time.time() - 2 * _io.STALE_AFTER_S
    for p in stale + foreign:
        os.utime(p, (hour_ago, hour_ago))
    _write(d, NEW)
    assert _content(d) == NEW
    assert not any(p.exists() for p in stale)
    assert young.exists() and all(p.exists() for p in foreign)


def test_real_directory_is_replaced_by_a_link(tmp_path):
    d = tmp_path / "entry"
    _make(d, "real")
    _write(d, NEW)
    assert d.is_symlink() and _content(d) == NEW and _names(tmp_path) == ["entry"]
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty", {"a": "1"})
    assert _content(tmp_path / "empty") == {"a": "1"}
    shutil.copytree(d, tmp_path / "copy")  # copies the content, not the link
    assert not (tmp_path / "copy").is_symlink() and _content(tmp_path / "copy") == NEW


def test_file_at_path_is_refused(tmp_path):
    (tmp_path / "f").write_text("keep")
    with pytest.raises(ValueError, match=r"f exists and is a file, not a directory"):
        _write(tmp_path / "f", NEW)
    assert (tmp_path / "f").read_text() == "keep" and _names(tmp_path) == ["f"]


def test_write_json_handles_tensors(tmp_path):
    import json

    import torch

    _io.write_json(tmp_path / "s.json", {"x": torch.tensor(1.5), "v": torch.arange(3)})
    assert json.loads((tmp_path / "s.json").read_text()) == {"x": 1.5, "v": [0, 1, 2]}
