"""Attribution scores as activation scalars (seed paper 003, Sec. 6.1, Fig. 9).

Activation patching, attribution patching (AtP), direct logit attribution (DLA) and
AttnLRP all give one score per location (site, layer, pos[, head]) for the logit
difference f_c - f_w. Plugged into Eq. 5 as fixed scalars alpha, they make an ActivScalar

    h~_{l,i}^(s) = h_{l,i}^(s) (1 + beta alpha_{l,i}^(s)),

whose only free parameter is the global strength beta. The scores were not trained for
steering, so their scale is arbitrary (DLA's are in logits, patching's are fractions of
the clean-vs-corrupted effect): ``fit_beta`` fits beta so that beta = +1 makes the
correct answer win and beta = -1 the wrong one (Eq. 6 at m = 0), and ``compare_with_trained``
reports E_0 and F of each next to a trained ActivScalar.

Layouts (``scalars_from_result``):

- ``("site", "layer", "pos")`` (sites among attn_out, mlp_out, resid_post) and
  ``("layer", "pos")`` (site from ``result.meta["site"]`` or ``site=``): one alpha per
  (site, layer, pos), positions ``"all"``, ``n_pos`` from the result.
- ``("layer", "head")``: site ``z``, each head scaled by its score at every position;
  ``("layer", "head", "pos")``: site ``z``, per head and position.

Normalisation: scores are divided by max |score| over the whole result (all sites), so
alpha is in [-1, 1] and the relative sizes across sites are kept (``normalize=False``
plugs in the raw scores, as the paper does). The alphas are frozen (requires_grad False).

Fitting beta: the evaluation runs beta = +1 and -1, so fitting beta* is the same as
scaling every alpha by beta*. ``fit_beta`` scores a grid of both signs and log-spaced
magnitudes (always including 1) and keeps the best E_0, ties broken by F; optional Adam
steps on log|beta| (Psi = E_m + lambda_F F) refine it. It returns the scaled copy.

Sign convention: alpha > 0 means the location pushes f_c - f_w up, so beta > 0
strengthens the correct answer and beta < 0 suppresses it, as Eq. 6 wants. DLA, AttnLRP
and gradient x input scores already say that (their target is f_c - f_w). Patching and
AtP scores are fractions of m_clean - m_corr: positive means the *clean* activation moves
the metric towards its clean value, which is towards c only when m_clean > m_corr. On
CCC the clean prompt asserts the wrong capital, so m_clean < m_corr and a positive score
means "carries the wrong answer". ``orient=True`` (default) therefore multiplies scores
by sign(m_clean - m_corr) when ``result.meta`` holds both (patching and AtP results do).
To first order, d(f_c - f_w)/d beta at 0 is sum_k alpha_k h_k . grad_{h_k}(f_c - f_w),
which for gradient x input scores is sum_k score_k^2 / max|score| >= 0 (tested); for
the other methods it holds as far as their scores track h . grad, and a fitted beta < 0
says the scores pointed the wrong way. Caveat for DLA ``attn_out``: its pos axis is the
*source* position read by the last token, but the scalar at (layer, pos) scales what
position pos's attention writes, a different activation.

>>> from mechsteer.attribution.atp import attribution_patching
>>> from mechsteer.tasks import ccc
>>> from mechsteer.tiny import tiny_model
>>> model = tiny_model("gpt2"); ds = ccc(model, n=8)
>>> iv = scalars_from_result(model, attribution_patching(model, ds, site="mlp_out"))
>>> iv.sites, tuple(iv.alpha("mlp_out").shape) == (2, ds.n_pos), iv.alpha("mlp_out").requires_grad
(('mlp_out',), True, False)
>>> scaled, table = fit_beta(model, iv, ds, progress=False)
>>> bool(table.loc[table["chosen"], "effectiveness"].iloc[0] >= table.loc[table["beta"] == 1, "effectiveness"].iloc[0])
True
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mechsteer._validate import check_finite, naming, finite_float, nonneg_int, positive_int
from mechsteer.attribution.result import AttributionResult
from mechsteer.interventions.base import Intervention
from mechsteer.interventions.evaluate import evaluate_splits, mean_e0_f
from mechsteer.interventions.objective import effectiveness, faithfulness, plus_minus_logits
from mechsteer.interventions.scalars import ActivScalar
from mechsteer.interventions.train import batch_view, batched_clean_logits, check_inputs, dataset_tensors
from mechsteer.sites import sites_for
LAYOUTS = (("site", "layer", "pos"), ("layer", "pos"), ("layer", "head"), ("layer", "head", "pos"))
TIE = 1e-6  # E_0 values this close count as tied (then F decides)


def default_betas() -> list[float]:
    """+-10^k for k in -2..2 in steps of 1/3 (26 values), plus 1."""
    mags = np.logspace(-2, 2, 13).tolist()
    return sorted({1.0, *mags, *(-m for m in mags)})


def orientation(result: AttributionResult) -> float:
    """sign(m_clean - m_corr) from ``result.meta`` (patching, AtP), else 1: the factor
    that turns "carries the clean-vs-corrupted difference" into "raises the metric".

    >>> from mechsteer.attribution.result import AttributionResult
    >>> r = AttributionResult(torch.ones(2, 3), ("layer", "pos"), "AtP", meta={"clean_metric": -2.0, "corrupted_metric": 9.0})
    >>> orientation(r)
    -1.0
    """
    clean, corrupted = result.meta.get("clean_metric"), result.meta.get("corrupted_metric")
    if clean is None or corrupted is None or not math.isfinite(clean - corrupted) or clean == corrupted:
        return 1.0
    return 1.0 if clean > corrupted else -1.0


def _site_alphas(result: AttributionResult, site: str | None, sites: Sequence[str] | None) -> dict:
    """{site: (layer, pos) scores} of a site-grid result."""
    if result.axes == ("layer", "pos"):
        name = site or result.meta.get("site")
        if not isinstance(name, str):
            raise ValueError("This ('layer', 'pos') result does not say its site; pass site='attn_out' (or mlp_out, resid_post).")
        grids = {name: result.scores}
    else:
        labels = result.axis_labels("site")
        grids = {s: result.scores[i] for i, s in enumerate(labels) if sites is None or s in sites}
        missing = [s for s in (sites or []) if s not in labels]
        if missing:
            raise ValueError(f"sites {missing} are not in this result; it has {labels}.")
    scalar_sites = sites_for("scalar")  # d_model sites an ActivScalar takes from a site grid
    bad = [s for s in grids if s not in scalar_sites]
    if bad:
        raise ValueError(f"Sites {bad} cannot become ActivScalar scalars (use {scalar_sites}); "
                         f"pass sites=[...] to keep only those.")
    return grids


def scalars_from_result(
    model,
    result: AttributionResult,
    *,
    n_pos: int | None = None,  # prompt length: needed for ("layer", "head"), else checked
    site: str | None = None,  # the site of a ("layer", "pos") result (default: result.meta["site"])
    sites: Sequence[str] | None = None,  # keep only these sites of a ("site", "layer", "pos") result
    normalize: bool = True,  # alpha = score / max|score| (in [-1, 1]); False: raw scores
    orient: bool = True,  # times sign(m_clean - m_corr) from result.meta (patching, AtP)
    slots: Sequence[str] | None = None,  # ("layer", "head") on mixed lengths: the positions to scale
) -> ActivScalar:
    """Fixed-alpha ActivScalar (Eq. 5) whose alphas are ``result``'s scores (see the module doc).

    A result on prompts of mixed lengths has a named or end-relative ``pos`` axis (its last
    label is ``"end"``): the ActivScalar then holds one alpha per such slot."""
    if not isinstance(result, AttributionResult):
        raise TypeError(f"result must be an AttributionResult, got {type(result).__name__}.")
    if result.axes not in LAYOUTS:
        raise ValueError(f"Result axes {result.axes} have no ActivScalar layout; supported: {LAYOUTS} "
                         "(use result.select(...) or result.sum(...) to get one).")
    n_pos = positive_int("n_pos", n_pos, allow_none=True)
    check_finite(f"scalars_from_result: scores of the {result.method} result", result.scores)
    cfg = model.cfg
    if result.scores.shape[result.axes.index("layer")] != cfg.n_layers:
        raise ValueError(f"The result has {result.scores.shape[result.axes.index('layer')]} layers, "
                         f"the model {cfg.n_layers}: compute it on this model.")
    if "head" in result.axes:
        if result.scores.shape[1] != cfg.n_heads:
            raise ValueError(f"The result has {result.scores.shape[1]} heads, the model {cfg.n_heads}.")
        scores = result.scores if "pos" in result.axes else result.scores.unsqueeze(-1)  # (L, H, P|1)
        if "pos" not in result.axes:
            if n_pos is None and slots is None:
                raise ValueError("A ('layer', 'head') result scales each head at every position: pass n_pos (or slots).")
            scores = scores.expand(-1, -1, len(slots) if slots is not None else n_pos)
        grids = {"z": scores.permute(0, 2, 1)}  # (L, P, H)
    else:
        grids = _site_alphas(result, site, sites)
    result_pos = next(iter(grids.values())).shape[1]
    if n_pos is not None and n_pos != result_pos and slots is None:
        raise ValueError(f"The result covers {result_pos} positions but n_pos={n_pos}; use a result "
                         "computed on prompts of that length.")
    scale = max(g.abs().max().item() for g in grids.values()) if normalize else 1.0
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"Cannot normalise scores with max |score| = {scale}; every score is 0 (or not finite).")
    scale *= orientation(result) if orient else 1.0
    if slots is None and "pos" in result.axes and result.axis_labels("pos")[-1] == "end":
        slots = result.axis_labels("pos")  # named / end-relative positions of mixed-length prompts
    if slots is not None:
        iv = ActivScalar.for_model(model, sites=list(grids), slots=list(slots))
    else:
        iv = ActivScalar.for_model(model, sites=list(grids), n_pos=result_pos)
    with torch.no_grad():
        for s, g in grids.items():
            iv.params[s].copy_(g / scale)
    iv.requires_grad_(False)
    return iv


def _measure(model, iv: Intervention, data: tuple, b: float, batch_size: int) -> tuple[float, float]:
    """(E_0, F) of ``iv`` with every alpha scaled by ``b`` (run at beta = +-b)."""
    tokens, correct, wrong, pos, where, clean = data
    with naming("fit_beta"):
        e, f = mean_e0_f(model, iv, tokens, correct, wrong, clean, batch_size=batch_size, strength=b, pos=pos, where=where)
    check_finite(f"fit_beta: E_0 and F at beta = {b:g}", torch.tensor([e, f]))
    return e, f


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

    beta = 1 (the alphas as given) is always tried, so the fit never scores below it.
    The copy's parameters are beta* times the input's (which is left untouched) and keep
    its requires_grad. The table has one row per beta tried: ``beta``, ``effectiveness``
    (E_0), ``faithfulness`` (F), ``source`` ("grid" or "adam") and ``chosen``.
    """
    if not isinstance(intervention, Intervention):
        raise TypeError(f"intervention must be a mechsteer Intervention, got {type(intervention).__name__}.")
    if isinstance(betas, (str, numbers.Number)):
        raise TypeError(f"betas must be a list of numbers (or None), got {betas!r}.")
    grid = default_betas() if betas is None else sorted({1.0, *(finite_float("betas", b) for b in betas)})
    refine_steps, batch_size = nonneg_int("refine_steps", refine_steps), positive_int("batch_size", batch_size)
    for name, v in (("lr", lr), ("margin", margin), ("lambda_f", lambda_f)):
        if finite_float(name, v) < 0 or (name == "lr" and v == 0):
            raise ValueError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {v}.")
    check_inputs(model, intervention, ds)
    device = next(model.parameters()).device
    iv = copy.deepcopy(intervention).to(device)
    data = dataset_tensors(model, iv, ds)  # tokens, correct, wrong, pos, where
    data = (*data, batched_clean_logits(model, data[0], batch_size, data[3]))
    rows = [(b, *_measure(model, iv, data, b, batch_size), "grid") for b in tqdm(grid, desc="fit beta", disable=not progress)]
    best = max(rows, key=lambda r: (round(r[1] / TIE), r[2]))
    if refine_steps and best[0] != 0:
        b = _refine(model, iv, data, best[0], refine_steps, lr, margin, lambda_f, batch_size)
        rows.append((b, *_measure(model, iv, data, b, batch_size), "adam"))
        best = max(rows, key=lambda r: (round(r[1] / TIE), r[2]))
    table = pd.DataFrame(rows, columns=["beta", "effectiveness", "faithfulness", "source"])
    table["chosen"] = [r is best for r in rows]
    with torch.no_grad():
        for p in iv.params.values():
            p.mul_(best[0])
    return iv, table


def attribution_scalars(model, result: AttributionResult, ds, **kwargs) -> ActivScalar:
    """``scalars_from_result`` then ``fit_beta`` on ``ds``: the fixed-alpha ActivScalar at beta*.

    Keyword arguments go to either (``site``, ``sites``, ``normalize``, ``orient`` / ``betas``,
    ``refine_steps``, ...); ``n_pos`` is ``ds.n_pos``.

    >>> from mechsteer.attribution.dla import direct_logit_attribution
    >>> from mechsteer.tasks import ccc
    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("llama"); ds = ccc(model, n=4)
    >>> iv = attribution_scalars(model, direct_logit_attribution(model, ds, site="z"), ds, progress=False)
    >>> iv.sites, tuple(iv.alpha("z").shape) == (2, ds.n_pos, 4)
    (('z',), True)
    """
    conv = {k: kwargs.pop(k) for k in ("site", "sites", "normalize", "orient") if k in kwargs}
    iv = scalars_from_result(model, result, **_lengths(ds, result), **conv)
    return fit_beta(model, iv, ds, **kwargs)[0]


def _lengths(ds, result: AttributionResult) -> dict:
    """``n_pos`` (prompts of one length) or, on mixed lengths, end-relative ``slots`` for a
    position-free ("layer", "head") result (a result with a pos axis brings its own)."""
    if not ds.is_padded:
        return {"n_pos": ds.n_pos}
    return {} if "pos" in result.axes else {"slots": ds.position_axis("end").labels}


def compare_with_trained(
    model,
    results: Mapping[str, AttributionResult],
    trained: Intervention,
    train_ds,
    test_ds,
    **kwargs,
) -> pd.DataFrame:
    """Fig. 9: each attribution's fixed-alpha ActivScalar (beta fitted on ``train_ds``) next
    to ``trained``, one row each: ``method``, ``beta`` (1 for the trained one), E_0
    (``*_effectiveness``) and F (``*_faithfulness``) on train and test, ``minimality``
    (count of |beta* alpha| > 0.01) and ``n_params``. ``kwargs`` as in ``attribution_scalars``.
    """
    conv = {k: kwargs.pop(k) for k in ("site", "sites", "normalize", "orient") if k in kwargs}
    fitted = {}
    for name, result in results.items():
        iv = scalars_from_result(model, result, **_lengths(train_ds, result), **conv)
        scaled, table = fit_beta(model, iv, train_ds, **kwargs)
        fitted[name] = (scaled, float(table.loc[table["chosen"], "beta"].iloc[0]))
    fitted[f"{type(trained).__name__} (trained)"] = (trained, 1.0)
    rows = []
    for name, (iv, beta) in fitted.items():
        s = evaluate_splits(model, iv, train_ds, test_ds, batch_size=kwargs.get("batch_size", 32))
        rows.append({
            "method": name, "beta": beta,
            **{f"{split}_{m}": s[split][m] for split in ("train", "test") for m in ("effectiveness", "faithfulness")},
            "minimality": s["train"]["minimality"], "n_params": s["train"]["n_params"],
        })
    return pd.DataFrame(rows)
