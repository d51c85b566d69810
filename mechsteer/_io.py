"""Atomic file writes: nothing is ever left half-written on disk.

Every file mechsteer writes (cache entries, reports, summaries, saved interventions) goes
to a temporary name in the same directory first and is then renamed into place with
``os.replace``, which is atomic on POSIX and Windows. A crash leaves either the old
file or the new one, never a truncated mix.

Directories (``atomic_dir``) cannot be renamed over a non-empty directory in one step,
so a directory written here is a symlink ``NAME -> .NAME.<hex>.dir`` to a hidden complete
copy beside it, and a rewrite swaps the link with one ``os.replace``. Read such a
directory through ``NAME`` as usual; to delete it, delete its parent folder or both the
link and ``os.path.realpath(NAME)`` (``shutil.rmtree`` refuses links); to move it, move
the parent folder (the link is relative) or copy it with ``shutil.copytree(NAME, dst)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

STALE_AFTER_S = 3600.0  # leftovers of interrupted directory writes older than this are deleted


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_path(d / "x.txt") as tmp:
    ...     _ = tmp.write_text("hello")
    >>> (d / "x.txt").read_text()
    'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give files the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    """JSON encoder for numpy / torch scalars and paths."""
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors (0-d gives a number)
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new directory beside ``path``; swap it in as ``path`` on success.

    ``path`` becomes a symlink to the hidden complete copy (``.NAME.<hex>.dir``), and a
    new save replaces the link in one ``os.replace``: at every instant ``path`` shows the
    old complete directory or the new one, even to another process and across a crash.
    The copy it replaced is deleted; leftovers of interrupted writes are deleted by a later
    write once they are over an hour old (younger ones may belong to a writer still at work).

    A real directory at ``path`` (from mechsteer before links, or an empty one) is moved
    aside and the link put in its place; that is two renames, and an exception between them
    (KeyboardInterrupt too) moves the old one back. Where symlinks cannot be made (Windows
    without developer mode) the new directory itself is renamed in the same way.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()) / "entry"
    >>> for text in ("old", "new"):
    ...     with atomic_dir(d) as tmp:
    ...         _ = (tmp / "a.txt").write_text(text)
    >>> (d / "a.txt").read_text(), d.is_symlink(), len(list(d.parent.iterdir()))
    ('new', True, 2)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise ValueError(f"atomic_dir: {path} exists and is a file, not a directory; refusing to replace it.")
    new = _fresh(path, "dir", mkdir=True)
    try:
        yield new
        mode = 0o666 & ~_umask()
        for f in new.rglob("*"):
            if f.is_file() and not f.is_symlink():
                os.chmod(f, mode)
        _swap_in(path, new)
    finally:
        if new.exists() and _target(path) != new.name:  # not swapped in: drop it
            shutil.rmtree(new, ignore_errors=True)
    _clean_stale(path)


def _fresh(path: Path, kind: str, *, mkdir: bool = False) -> Path:
    """An unused hidden name ``.NAME.<12 hex>.KIND`` beside ``path`` (made a directory if ``mkdir``)."""
    while True:
        p = path.with_name(f".{path.name}.{secrets.token_hex(6)}.{kind}")
        if not mkdir:
            if not os.path.lexists(p):
                return p
            continue
        try:
            p.mkdir(mode=0o777)  # the umask applies: the usual permissions
            return p
        except FileExistsError:
            continue


def _target(path: Path) -> str | None:
    """The name a link at ``path`` points to (None when ``path`` is no link)."""
    try:
        return os.readlink(path)
    except (OSError, ValueError):
        return None


def _ours(path: Path, name: str | None) -> bool:
    """Whether ``name`` is one of the hidden versions/leftovers this module makes for ``path``."""
    if name is None:
        return False
    stem = re.escape(path.name)
    # ours: .NAME.<hex>.dir / .link; from earlier versions: .NAME.<mkdtemp>.tmp, .NAME.old.<pid>
    return re.fullmatch(rf"\.{stem}\.([0-9a-f]{{12}}\.(dir|link)|[a-z0-9_]{{8}}\.tmp|old\.[0-9]+)", name) is not None


def _swap_in(path: Path, new: Path) -> None:
    """Make ``path`` show the complete directory ``new``; the old content stays until then."""
    link = _fresh(path, "link")
    try:
        try:
            os.symlink(new.name, link, target_is_directory=True)  # relative: the folder can move
        except (OSError, NotImplementedError):  # no symlinks here: rename the directory itself
            link = None
        src = new if link is None else link
        if os.path.lexists(path) and not path.is_symlink():  # a real directory: not atomic, restored
            aside = _fresh(path, "dir")
            try:
                os.replace(path, aside)
                os.replace(src, path)
            finally:
                if not os.path.lexists(path) and os.path.lexists(aside):
                    os.replace(aside, path)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            old = _target(path)
            os.replace(src, path)  # the one atomic step
            if _ours(path, old) and old != new.name:
                shutil.rmtree(path.with_name(old), ignore_errors=True)
    finally:
        if link is not None and os.path.lexists(link):
            os.unlink(link)


def _clean_stale(path: Path) -> None:
    """Delete hidden leftovers of ``path`` (not its current target) older than ``STALE_AFTER_S``."""
    live, now = _target(path), time.time()
    with os.scandir(path.parent) as it:
        entries = [e for e in it if e.name != live and _ours(path, e.name)]
    for e in entries:
        try:
            if now - e.stat(follow_symlinks=False).st_mtime < STALE_AFTER_S:
                continue
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                os.unlink(e.path)
        except FileNotFoundError:  # another writer cleaned it first
            continue
