"""Evaluating a learned intervention (seed paper 003, Sec. 3.4).

Three measures, each on a dataset split (train or test):

- Effectiveness E_0: Eq. 6 with margin m = 0, in (-inf, 0]. E_0 = 0 means beta = +1 always
  makes the correct answer win and beta = -1 always makes the wrong one win.
- Faithfulness F: Eq. 7 unchanged, in (-inf, 0]; 0 means the full next-token distribution
  at the last position is untouched at beta = +1 and -1. Both read each prompt's own last
  token x_n (Eq. 7's f(x_n)), so right-padded prompts of mixed lengths count exactly as
  each prompt alone; pad positions never enter a mean.
- Minimality: the number of non-negligible parameters, |theta_j| > 0.01 (the paper's
  threshold). For SteerVec also the number of locations (site, layer, pos[, head]) whose
  vector has any such element, since one location costs d_model parameters there.

Plus ``n_params`` = |vec(theta)|. A zero-initialised intervention is the identity, so it
scores F = 0 and E_0 equal to the unsteered hinge (the model's own errors count once
for beta = +1, its correct answers once for beta = -1).

>>> from mechsteer.interventions import ActivScalar
>>> from mechsteer.tasks import ccc
>>> from mechsteer.tiny import tiny_model
>>> model = tiny_model("gpt2"); ds = ccc(model, n=4)
>>> r = evaluate(model, ActivScalar.for_model(model, sites=["attn_out"], n_pos=ds.n_pos), ds)
>>> sorted(r), r["minimality"], r["n_params"] == 2 * ds.n_pos
(['effectiveness', 'faithfulness', 'minimality', 'n_params'], 0, True)
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechsteer._validate import naming, check_finite, finite_float, positive_int
from mechsteer.interventions.base import Intervention
from mechsteer.interventions.objective import (
    clean_last_logits,
    effectiveness,
    faithfulness,
    plus_minus_logits,
)
from mechsteer.interventions.train import batch_view, check_inputs, dataset_tensors
from mechsteer.interventions.vectors import SteerVec
from mechsteer.runs import float32_logits

NEGLIGIBLE = 0.01  # Sec. 3.4: parameters with |value| <= 0.01 count as zero


def minimality_count(intervention: Intervention, threshold: float = NEGLIGIBLE) -> int:
    """Number of parameters with |value| > ``threshold`` (Sec. 3.4's minimality)."""
    threshold = finite_float("threshold", threshold)
    return int(sum((p.detach().abs() > threshold).sum().item() for p in intervention.params.values()))


def active_locations(intervention: SteerVec, threshold: float = NEGLIGIBLE) -> int:
    """SteerVec: number of locations whose vector v has any |element| > ``threshold``.

    A location is (site, layer, pos), or (site, layer, pos, head) for per-head ``z``: every
    axis of the parameter tensor but the last (d_model or d_head).
    """
    if not isinstance(intervention, SteerVec):
        raise TypeError(f"active_locations counts SteerVec vectors; got {type(intervention).__name__}.")
    threshold = finite_float("threshold", threshold)
    return int(sum((p.detach().abs() > threshold).any(-1).sum().item() for p in intervention.params.values()))


@torch.no_grad()
def per_prompt_e0_f(
    model, intervention: Intervention, tokens: Int[Tensor, "batch pos"], correct: Int[Tensor, " batch"],
    wrong: Int[Tensor, " batch"], clean: Float[Tensor, "batch vocab"] | None = None, *, batch_size: int = 32,
    strength: float = 1.0, pos: int | Int[Tensor, " batch"] = -1, where: Tensor | None = None,
) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"]]:
    """Each prompt's E_0 and F, ``batch_size`` prompts per forward (each run at
    beta = +strength and -strength in that forward: 2 x batch_size sequences). ``clean``:
    the clean logits if already computed (else one clean pass per batch). ``pos``: each
    prompt's answer position (``ds.answer_pos``); ``where``: its token indices to bind
    (``intervention.token_index(ds)``); ``train.dataset_tensors`` gives all of them."""
    e, f = [], []
    for i in range(0, tokens.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        t, p, w = batch_view(tokens, pos, where, sl)
        c = clean_last_logits(model, t, p) if clean is None else clean[sl]
        f_plus, f_minus = plus_minus_logits(model, intervention, t, strength, pos=p, where=w)  # one pass, beta = +-strength
        e.append(effectiveness(f_plus, f_minus, correct[sl], wrong[sl], margin=0.0, reduce="none"))
        f.append(faithfulness(f_plus, f_minus, c, reduce="none"))
    return torch.cat(e), torch.cat(f)


def mean_e0_f(model, intervention: Intervention, tokens, correct, wrong, clean=None, **kwargs) -> tuple[float, float]:
    """(E_0, F) averaged over all prompts (``per_prompt_e0_f``'s arguments)."""
    e, f = per_prompt_e0_f(model, intervention, tokens, correct, wrong, clean, **kwargs)
    return e.mean().item(), f.mean().item()


@torch.no_grad()
def evaluate(model, intervention: Intervention, ds, batch_size: int = 32) -> dict[str, float | int]:
    """E_0, F, minimality (count of |theta| > 0.01) and n_params of ``intervention`` on ``ds``.

    SteerVec results also hold ``n_locations``: locations with a non-negligible vector.
    E_0 and F are means over all prompts of ``ds``, ``batch_size`` prompts per forward
    (each at beta = +1 and -1; exact for any batch size).
    """
    if not isinstance(intervention, Intervention):
        raise TypeError(f"intervention must be a mechsteer Intervention, got {type(intervention).__name__}.")
    batch_size = positive_int("batch_size", batch_size)
    n = ds.tokens.shape[0]
    if n == 0:
        raise ValueError("ds is empty: nothing to evaluate.")
    check_inputs(model, intervention, ds)
    for site, p in intervention.params.items():
        check_finite(f"evaluate: the intervention's parameters at site {site!r}", p.detach())
    device = next(model.parameters()).device
    intervention.to(device)
    tokens, correct, wrong, pos, where = dataset_tensors(model, intervention, ds)
    with naming("evaluate"), float32_logits(model):  # bf16/fp16: logits, E_0 and KL in float32
        e0, f = mean_e0_f(model, intervention, tokens, correct, wrong, batch_size=batch_size, pos=pos, where=where)
    check_finite("evaluate: effectiveness E_0 and faithfulness F", torch.tensor([e0, f]))
    out: dict[str, float | int] = {
        "effectiveness": e0,
        "faithfulness": f,
        "minimality": minimality_count(intervention),
        "n_params": intervention.n_params,
    }
    if isinstance(intervention, SteerVec):
        out["n_locations"] = active_locations(intervention)
    return out


def evaluate_splits(
    model, intervention: Intervention, train_ds, test_ds, batch_size: int = 32
) -> dict[str, dict[str, float | int]]:
    """``evaluate`` on both splits: ``{"train": {...}, "test": {...}}``."""
    return {
        "train": evaluate(model, intervention, train_ds, batch_size),
        "test": evaluate(model, intervention, test_ds, batch_size),
    }
