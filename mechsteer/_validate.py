"""Checks of user input and of numbers on their way out: each raises an error that names
the argument (or the place a non-finite value appeared), never passes a NaN on.

>>> positive_int("n", 3)
3
>>> positive_int("n", -3)
Traceback (most recent call last):
...
ValueError: n must be a positive integer, got -3.
>>> import torch
>>> check_finite("DLA scores", torch.tensor([1.0, float("nan")]))
Traceback (most recent call last):
...
FloatingPointError: DLA scores: 1 of 2 values are NaN or infinite (first at index (1,)). ...
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import math
import numbers

import torch
from torch import Tensor


def positive_int(name: str, value, *, allow_none: bool = False):
    """``value`` as an int if it is a positive integer (bools refused); else ValueError/TypeError naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer() and value > 0:
            return int(value)
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__}).")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}.")
    return int(value)


def nonneg_int(name: str, value):
    """``value`` as an int if it is an integer >= 0 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative integer, got {value!r} ({type(value).__name__}).")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value}.")
    return int(value)


def finite_float(name: str, value) -> float:
    """``value`` as a float if it is a finite real number (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number, got {value!r} ({type(value).__name__}).")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}.")
    return float(value)


def check_finite(where: str, x: Tensor) -> Tensor:
    """Return ``x`` if every value is finite; else FloatingPointError naming ``where``.

    Used on metrics, scores and logits leaving a method, so that a NaN weight or an
    overflow surfaces as an error at the step that produced it, not as a NaN heatmap.
    """
    if not isinstance(x, Tensor) or not (x.is_floating_point() or x.is_complex()):
        return x
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise FloatingPointError(
            f"{where}: {int(bad.sum())} of {x.numel()} values are NaN or infinite (first at index {first}). "
            "Check the model's weights and inputs (a NaN weight or an overflow in half precision "
            "gives this); mechsteer stops here rather than pass the NaN on."
        )
    return x


@contextlib.contextmanager
def naming(who: str) -> Iterator[None]:
    """Inside the block, a FloatingPointError (a metric came out NaN or infinite, e.g. from
    a NaN weight) is re-raised with ``who`` (the method the user called) named first."""
    try:
        yield
    except FloatingPointError as err:
        raise FloatingPointError(f"{who}: {err}") from err
