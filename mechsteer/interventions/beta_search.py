"""Choosing the strength beta of a fixed-alpha intervention (seed paper 003, Sec. 6.1).

An intervention whose parameters are not trained (attribution scores plugged into Eq. 5
by ``from_attribution.scalars_from_result``) has one free knob, beta. The evaluation runs
+beta and -beta (Eq. 6 at m = 0), so trying beta is scaling every alpha by beta.

- ``sweep_beta`` (the paper's procedure, Fig. 9): E_0, F and minimality on a grid of
  betas; the best by the paper's evaluation (the largest E_0, ties: the largest F).
- ``fit_beta`` (the paper's future work, Sec. 8): the grid, then Adam steps on log|beta|
  maximising Psi = E_m + lambda_F F.
- ``choose_beta``: either by name, or a fixed number.

>>> from mechsteer.interventions import ActivScalar
>>> from mechsteer.tasks import ccc
>>> from mechsteer.tiny import tiny_model
>>> model = tiny_model("gpt2"); ds = ccc(model, n=4)
>>> iv = ActivScalar.for_model(model, sites=["mlp_out"], n_pos=ds.n_pos, init_std=0.1)
>>> scaled, table = sweep_beta(model, iv, ds, betas=[-1.0, 10.0], progress=False)
>>> table["beta"].tolist(), int(table["chosen"].sum())
([-1.0, 1.0, 10.0], 1)
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mechsteer._validate import check_finite, finite_float, naming, nonneg_int, positive_int
from mechsteer.interventions.base import Intervention
from mechsteer.interventions.evaluate import NEGLIGIBLE, mean_e0_f
from mechsteer.interventions.objective import effectiveness, faithfulness, plus_minus_logits
from mechsteer.interventions.train import batch_view, batched_clean_logits, check_inputs, dataset_tensors

TIE = 1e-6  # E_0 values this close count as tied (then F decides)


def default_betas() -> list[float]:
    """+-10^k for k in -2..2 in steps of 1/3 (26 values), plus 1 (``fit_beta``'s grid)."""
    mags = np.logspace(-2, 2, 13).tolist()
    return sorted({1.0, *mags, *(-m for m in mags)})


def sweep_betas() -> list[float]:
    """+-10^k for k in -3..2 in steps of 1/3: 32 values, 1 among them (``sweep_beta``'s grid).

    >>> b = sweep_betas(); len(b), b[0], 1.0 in b
    (32, -100.0, True)
    """
    mags = np.logspace(-3, 2, 16).tolist()
    return sorted({1.0, *mags, *(-m for m in mags)})


BETA_MODES = ("sweep", "fit")  # attribution_scalars / compare_with_trained: how beta is chosen


def _measure(model, iv: Intervention, data: tuple, b: float, batch_size: int, name: str = "sweep_beta"
             ) -> tuple[float, float, int]:
    """(E_0, F, count of |b alpha| > 0.01) of ``iv`` with every alpha scaled by ``b`` (run at
    beta = +-b); errors name the caller ``name``."""
    tokens, correct, wrong, pos, where, clean = data
    with naming(name):
        e, f = mean_e0_f(model, iv, tokens, correct, wrong, clean, batch_size=batch_size, strength=b, pos=pos, where=where)
    check_finite(f"{name}: E_0 and F at beta = {b:g}", torch.tensor([e, f]))
    m = sum(int((p.detach().abs() * abs(b) > NEGLIGIBLE).sum()) for p in iv.params.values())
    return e, f, m


def _grid(betas, default) -> list[float]:
    if isinstance(betas, (str, numbers.Number)):
        raise TypeError(f"betas must be a list of numbers (or None), got {betas!r}.")
    return default() if betas is None else sorted({1.0, *(finite_float("betas", b) for b in betas)})


def _prepare(model, intervention, ds, batch_size: int) -> tuple[Intervention, tuple]:
    """A copy of ``intervention`` on the model's device and the data tensors with clean logits."""
    if not isinstance(intervention, Intervention):
        raise TypeError(f"intervention must be a mechsteer Intervention, got {type(intervention).__name__}.")
    check_inputs(model, intervention, ds)
    device = next(model.parameters()).device
    iv = copy.deepcopy(intervention).to(device)
    data = dataset_tensors(model, iv, ds)  # tokens, correct, wrong, pos, where
    return iv, (*data, batched_clean_logits(model, data[0], batch_size, data[3]))


def _best(rows: list[tuple]) -> tuple:
    """The paper's criterion: the largest E_0 (Eq. 6, m = 0); ties (within TIE): the largest F."""
    return max(rows, key=lambda r: (round(r[1] / TIE), r[2]))


def _scaled(iv: Intervention, beta: float) -> Intervention:
    with torch.no_grad():
        for p in iv.params.values():
            p.mul_(beta)
    return iv


def sweep_beta(
    model,
    intervention: Intervention,
    ds,
    *,
    betas: Sequence[float | int] | None = None,  # None: sweep_betas() (both signs, 1e-3..1e2, and 1)
    batch_size: int = 32,  # prompts per forward (each at +beta and -beta in it)
    progress: bool = True,
) -> tuple[Intervention, pd.DataFrame]:
    """Sec. 6.1 / Fig. 9: E_0, F and minimality of the fixed-alpha ``intervention`` at each
    beta of the grid; the copy scaled by the best beta (largest E_0, ties: F) and the table.

    The table has one row per beta: ``beta``, ``effectiveness`` (E_0), ``faithfulness`` (F),
    ``minimality`` (count of |beta alpha| > 0.01) and ``chosen`` (the best row). beta = 1
    (the scores as given) is always a row. The input is left untouched.
    """
    grid, batch_size = _grid(betas, sweep_betas), positive_int("batch_size", batch_size)
    iv, data = _prepare(model, intervention, ds, batch_size)
    rows = [(b, *_measure(model, iv, data, b, batch_size)) for b in tqdm(grid, desc="sweep beta", disable=not progress)]
    best = _best(rows)
    table = pd.DataFrame(rows, columns=["beta", "effectiveness", "faithfulness", "minimality"])
    table["chosen"] = [r is best for r in rows]
    return _scaled(iv, best[0]), table


def _refine(model, iv, data, b0: float, steps: int, lr: float, margin: float, lambda_f: float, batch_size: int) -> float:
    """Adam on u with beta = b0 exp(u) (sign kept), maximising Psi = E_m + lambda_F F."""
    tokens, correct, wrong, pos, where, clean = data
    u = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([u], lr=lr)
    for step in range(steps):
        sl = slice((step * batch_size) % len(tokens), (step * batch_size) % len(tokens) + batch_size)
        t, p, w = batch_view(tokens, pos, where, sl)
        with torch.enable_grad():
            plus, minus = plus_minus_logits(model, iv, t, (b0 * u.exp()).to(tokens.device), pos=p, where=w)
            psi = effectiveness(plus, minus, correct[sl], wrong[sl], margin) + lambda_f * faithfulness(plus, minus, clean[sl])
            (g,) = torch.autograd.grad(-psi, [u])
        u.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
    b = float(b0 * u.detach().exp())
    if not math.isfinite(b) or b == 0:
        raise FloatingPointError(f"fit_beta: refining beta from {b0:g} gave beta = {b}; lower lr or refine_steps.")
    return b


def fit_beta(
    model,
    intervention: Intervention,
    ds,
    *,
    betas: Sequence[float | int] | None = None,  # None: default_betas() (both signs, 1e-2..1e2)
    refine_steps: int = 0,  # Adam steps on log|beta| after the grid (0: grid only)
    lr: float = 0.05,  # Adam step on log|beta|
    margin: float = 1.0,  # m of E_m while refining
    lambda_f: float = 1.0,  # lambda_F while refining
    batch_size: int = 32,  # prompts per forward (each at beta = +1 and -1 in it)
    progress: bool = True,
) -> tuple[Intervention, pd.DataFrame]:
    """Fit the strength beta* maximising E_0 on ``ds`` (ties: F); return the scaled copy.

    Not the paper's procedure (that is ``sweep_beta``: raw scores, a grid) but its future
    work: the grid (``default_betas``, made for normalised scores), then ``refine_steps``
    Adam steps on log|beta| maximising Psi = E_m + lambda_F F.
    beta = 1 (the alphas as given) is always tried, so the fit never scores below it.
    The copy's parameters are beta* times the input's (which is left untouched) and keep
    its requires_grad. The table has one row per beta tried: ``beta``, ``effectiveness``
    (E_0), ``faithfulness`` (F), ``minimality``, ``source`` ("grid" or "adam") and ``chosen``.
    """
    grid = _grid(betas, default_betas)
    refine_steps, batch_size = nonneg_int("refine_steps", refine_steps), positive_int("batch_size", batch_size)
    for name, v in (("lr", lr), ("margin", margin), ("lambda_f", lambda_f)):
        if finite_float(name, v) < 0 or (name == "lr" and v == 0):
            raise ValueError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {v}.")
    iv, data = _prepare(model, intervention, ds, batch_size)
    rows = [(b, *_measure(model, iv, data, b, batch_size, "fit_beta"), "grid")
            for b in tqdm(grid, desc="fit beta", disable=not progress)]
    best = _best(rows)
    if refine_steps and best[0] != 0:
        b = _refine(model, iv, data, best[0], refine_steps, lr, margin, lambda_f, batch_size)
        rows.append((b, *_measure(model, iv, data, b, batch_size, "fit_beta"), "adam"))
        best = _best(rows)
    table = pd.DataFrame(rows, columns=["beta", "effectiveness", "faithfulness", "minimality", "source"])
    table["chosen"] = [r is best for r in rows]
    return _scaled(iv, best[0]), table


def choose_beta(model, iv: Intervention, ds, beta: str | float = "sweep", **kwargs) -> tuple[Intervention, pd.DataFrame]:
    """``beta="sweep"`` (the paper: ``sweep_beta``), ``"fit"`` (``fit_beta``, with
    ``refine_steps`` 20 unless given) or a number (that beta, no search: a one-row table)."""
    if beta == "sweep":
        return sweep_beta(model, iv, ds, **kwargs)
    if beta == "fit":
        return fit_beta(model, iv, ds, **{"refine_steps": 20, **kwargs})
    if isinstance(beta, str) or not isinstance(beta, numbers.Real):
        raise ValueError(f"beta must be one of {list(BETA_MODES)} or a number, got {beta!r}.")
    beta = finite_float("beta", beta)
    batch_size = positive_int("batch_size", kwargs.get("batch_size", 32))
    iv, data = _prepare(model, iv, ds, batch_size)
    table = pd.DataFrame([(beta, *_measure(model, iv, data, beta, batch_size), True)],
                         columns=["beta", "effectiveness", "faithfulness", "minimality", "chosen"])
    return _scaled(iv, beta), table
