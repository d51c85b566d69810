"""Telling ``model.generate``'s forwards from plain runs (``Intervention.apply(generation="auto")``)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator


@contextlib.contextmanager
def watch_generate(model) -> Iterator[dict[str, int]]:
    """Inside the block, ``model.generate`` marks its forwards (``scope["active"]``) and numbers
    its calls (``scope["call"]``): a wrapper in this instance's ``__dict__`` (the bridge
    forwards ``setattr``), removed on exit; an outer block's wrapper is called through."""
    scope = {"active": 0, "call": 0}
    inner = model.generate  # the class's method, or an outer block's wrapper
    saved = model.__dict__.get("generate")

    @functools.wraps(inner)
    def generate(*args, **kwargs):
        scope["call"] += 1
        scope["active"] += 1
        try:
            return inner(*args, **kwargs)
        finally:
            scope["active"] -= 1

    model.__dict__["generate"] = generate
    try:
        yield scope
    finally:
        if saved is None:
            model.__dict__.pop("generate", None)
        else:
            model.__dict__["generate"] = saved
