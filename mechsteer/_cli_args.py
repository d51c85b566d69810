"""Argument types and checks of the ``mechsteer`` command line.

Each ``type=`` function below turns one option's text into a value or raises
``argparse.ArgumentTypeError`` with a one-line reason, so that a bad value stops the
command at parse time, before any model is loaded:

    mechsteer: error: --n: expected a positive integer, got '-5'

The rules are mechsteer._validate's; the names a list option accepts come from the
library's own registries (imported when the option is parsed, not for ``--help``).
``check_out_dir`` refuses an output directory that cannot be written, also before any work.

>>> positive_int("3")
3
>>> positions("0,-1")
[0, -1]
>>> positive_int("-5")
Traceback (most recent call last):
...
argparse.ArgumentTypeError: expected a positive integer, got '-5'
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from mechsteer import _validate


class OptionError(ValueError):
    """A bad option value found after parsing; its message starts with the option's name."""

    def __init__(self, option: str, reason: str):
        super().__init__(f"{option}: {reason}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``mechsteer: error: --n: ...``, exit status 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"mechsteer: error: {one_line(message.removeprefix('argument '))}\n")


def one_line(message: object) -> str:
    """``message`` with its line breaks and indentation folded into single spaces."""
    return re.sub(r"\s*\n\s*", " ", str(message)).strip()


def _checked(rule: Callable, what: str, parse: Callable = int) -> Callable[[str], object]:
    """An argparse type: ``parse`` the text, then apply a rule of mechsteer._validate."""

    def convert(text: str):
        try:
            return rule("value", parse(text))
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    convert.__name__ = what
    return convert


def _positive_float(name: str, value: float) -> float:
    value = _validate.finite_float(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}.")
    return value


def _nonneg_float(name: str, value: float) -> float:
    value = _validate.finite_float(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")
    return value


positive_int = _checked(_validate.positive_int, "a positive integer")
nonneg_int = _checked(_validate.nonneg_int, "an integer >= 0")
finite_float = _checked(_validate.finite_float, "a finite number", float)
positive_float = _checked(_positive_float, "a finite number > 0", float)
nonneg_float = _checked(_nonneg_float, "a finite number >= 0", float)


def csv(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated list."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _list_of(item: Callable[[str], object], what: str, *, allow_empty: bool = False) -> Callable[[str], list]:
    """An argparse type for a comma-separated list whose items all pass ``item``."""

    def convert(text: str) -> list:
        items = [t.strip() for t in text.split(",")]
        if items == [""] and allow_empty:
            return []
        try:
            return [item(t) for t in items]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None

    convert.__name__ = what
    return convert


nonneg_floats = _list_of(nonneg_float, "finite numbers >= 0")  # pareto's grids of lambda_F, lambda_M, m


def positions(text: str) -> str | list[int]:
    """``all``, ``last`` or distinct token positions (negative ones count from the end)."""
    if text in ("all", "last"):
        return text
    out = _list_of(_checked(lambda name, v: v, "integers"), "integers")(text)
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"expected distinct positions, got {text!r}")
    return out


def layers(text: str) -> tuple[int, ...] | None:
    """``all`` (None) or distinct layer indices >= 0."""
    if text == "all":
        return None
    out = _list_of(nonneg_int, "layer indices >= 0 (or 'all')")(text)
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"expected distinct layers, got {text!r}")
    return tuple(out)


def names(registry: Callable[[], Sequence[str]], *, allow_empty: bool = False) -> Callable[[str], tuple[str, ...]]:
    """An argparse type for a comma-separated list of distinct names from ``registry()``."""

    def convert(text: str) -> tuple[str, ...]:
        items = csv(text)
        known = list(registry())
        unknown = [t for t in items if t not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown))}; choose from {','.join(known)}")
        if not items and not allow_empty:
            raise argparse.ArgumentTypeError(f"expected at least one of {','.join(known)}, got {text!r}")
        if len(set(items)) != len(items):
            raise argparse.ArgumentTypeError(f"a name is given twice in {text!r}")
        return tuple(items)

    convert.__name__ = "names"
    return convert


def one_name(registry: Callable[[], Sequence[str]]) -> Callable[[str], str]:
    """An argparse type for one name from ``registry()``."""

    def convert(text: str) -> str:
        known = list(registry())
        if text not in known:
            raise argparse.ArgumentTypeError(f"unknown {text!r}; choose from {', '.join(known)}")
        return text

    convert.__name__ = "name"
    return convert


# The library's registries, imported only when an option that needs them is parsed.
def attribution_methods() -> Sequence[str]:
    from mechsteer.attribution.suite import METHODS

    return METHODS


def steer_methods() -> Sequence[str]:
    from mechsteer.interventions.kinds import KINDS

    return list(KINDS)


def steer_sites() -> Sequence[str]:
    from mechsteer.sites import sites_for

    return sites_for("intervene")


def fv_tasks() -> Sequence[str]:
    from mechsteer.tasks.fv import FV_TASKS

    return FV_TASKS


def fv_selections() -> Sequence[str]:
    from mechsteer.fv.pipeline import SELECTIONS

    return SELECTIONS


def fv_injections() -> Sequence[str]:
    from mechsteer.fv.pipeline import INJECTIONS

    return INJECTIONS


def check_out_dir(path: str, option: str = "--out") -> Path:
    """Refuse an output directory that cannot be created and written, without creating it.

    An existing directory is fine (files in it are replaced); an existing file, a path
    below a file, or a place where nothing can be written raises OptionError naming
    ``option``. The check writes (and removes) a temporary directory in the deepest part of
    ``path`` that exists, so permissions, read-only file systems and root all count as
    they will when the results are written.
    """
    if not path:
        raise OptionError(option, "expected a directory, got ''")
    target = Path(path).expanduser()
    try:
        if target.exists() and not target.is_dir():
            raise OptionError(option, f"{path!r} is an existing file; give a directory (created if missing)")
        base = target
        while not base.exists():  # the deepest existing ancestor ("/" and "." exist)
            base = base.parent
        if not base.is_dir():
            raise OptionError(option, f"cannot create directory {path!r}: {str(base)!r} is a file")
    except OSError as e:  # stat refused (a parent directory without search permission)
        raise OptionError(option, f"cannot use {path!r}: {e.strerror or e}") from None
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mechsteer-write-check-", dir=base))
    except OSError as e:
        where = "" if base == target else f" (where {path!r} would be created)"
        raise OptionError(option, f"cannot write in {str(base)!r}{where}: {e.strerror or e}") from None
    return target


def data_file(text: str) -> str:
    """``--data``: an existing .jsonl / .json / .csv file of records (checked before any model loads)."""
    path = Path(text)
    if path.suffix.lower() not in (".jsonl", ".json", ".csv"):
        raise argparse.ArgumentTypeError(f"expected a .jsonl, .json or .csv file of records, got {text!r}")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return str(path)
