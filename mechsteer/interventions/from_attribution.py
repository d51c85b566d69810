"""Attribution scores as activation scalars (seed paper 003, Sec. 6.1, Fig. 9).

Activation patching, attribution patching (AtP), direct logit attribution (DLA; per
position: ``mechsteer.attribution.dla_per_position``) and AttnLRP all give one score per
location (site, layer, pos[, head]) for the logit difference f_c - f_w. Plugged into Eq. 5
as fixed scalars alpha, they make an ActivScalar

    h~_{l,i}^(s) = h_{l,i}^(s) (1 + beta alpha_{l,i}^(s)),

whose only free parameter is the global strength beta. The paper's procedure (Sec. 6.1,
Fig. 9), the default here: plug in the RAW scores ("plugging them directly into Eq. 5")
and sweep beta ("tune the beta parameter to globally strengthen, weaken or flip the
interventional effect"). ``sweep_beta`` returns a table of E_0, F (Sec. 3.4, each run at
+beta and -beta as Eq. 6 does at +-1) and minimality (count of |beta alpha| > 0.01) per
beta, and the beta that is best by the paper's evaluation, Eq. 6 at m = 0 (largest E_0;
ties: largest F). The row beta = 1 is always there: it is the scores as given, which the
paper reads off Fig. 9 (DLA's scores are on "a much larger scale" and do not flip the
answer between beta = -1 and 1). ``compare_with_trained`` puts each beside a trained
ActivScalar.

Options (not the paper's): ``normalize=True`` divides the scores by max |score| over the
whole result (all sites), so alpha is in [-1, 1] and the relative sizes across sites are
kept; ``beta="fit"`` (``fit_beta``) adds Adam steps on log|beta| after the grid, fitting
beta*, which the paper leaves to future work (Sec. 8). The alphas are frozen
(requires_grad False).

Layouts (``scalars_from_result``):

- ``("site", "layer", "pos")`` (sites among attn_out, mlp_out, resid_post) and
  ``("layer", "pos")`` (site from ``result.meta["site"]`` or ``site=``): one alpha per
  (site, layer, pos), positions ``"all"``, ``n_pos`` from the result.
- ``("layer", "head")``: site ``z``, each head scaled by its score at every position;
  ``("layer", "head", "pos")``: site ``z``, per head and position.

Sweeping beta: the evaluation runs beta = +1 and -1, so trying beta is the same as
scaling every alpha by beta. The grids hold both signs and log-spaced magnitudes, always
including 1 (``sweep_betas``: 1e-3..1e2, wide enough for raw scores in logits or in
fractions of a patching effect; ``default_betas``: 1e-2..1e2, ``fit_beta``'s historical
grid for normalised scores).

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
>>> iv = scalars_from_result(model, attribution_patching(model, ds, site="mlp_out"))  # raw scores
>>> iv.sites, tuple(iv.alpha("mlp_out").shape) == (2, ds.n_pos), iv.alpha("mlp_out").requires_grad
(('mlp_out',), True, False)
>>> scaled, table = sweep_beta(model, iv, ds, progress=False)
>>> list(table.columns), int(table["chosen"].sum())
(['beta', 'effectiveness', 'faithfulness', 'minimality', 'chosen'], 1)
>>> bool(table.loc[table["chosen"], "effectiveness"].iloc[0] >= table.loc[table["beta"] == 1, "effectiveness"].iloc[0])
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from mechsteer._validate import check_finite, positive_int
from mechsteer.attribution.result import AttributionResult
from mechsteer.interventions.base import Intervention
from mechsteer.interventions.beta_search import (  # noqa: F401 (re-exported: the Sec. 6.1 API in one place)
    BETA_MODES,
    choose_beta,
    default_betas,
    fit_beta,
    sweep_beta,
    sweep_betas,
)
from mechsteer.interventions.evaluate import evaluate_splits
from mechsteer.interventions.scalars import ActivScalar
from mechsteer.sites import sites_for

LAYOUTS = (("site", "layer", "pos"), ("layer", "pos"), ("layer", "head"), ("layer", "head", "pos"))


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
    normalize: bool = False,  # False: raw scores (the paper); True: alpha = score / max|score| (in [-1, 1])
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
    top = max(g.abs().max().item() for g in grids.values())
    if not (math.isfinite(top) and top > 0):
        raise ValueError(f"Scores with max |score| = {top} give no intervention; every score is 0 (or not finite).")
    scale = top if normalize else 1.0
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


def attribution_scalars(model, result: AttributionResult, ds, *, beta: str | float = "sweep", **kwargs) -> ActivScalar:
    """``scalars_from_result`` then ``choose_beta`` on ``ds``: the fixed-alpha ActivScalar at
    the chosen beta (default: raw scores, the best beta of ``sweep_beta``, as the paper).

    Keyword arguments go to either (``site``, ``sites``, ``normalize``, ``orient`` / ``betas``,
    ``batch_size``, and for ``beta="fit"`` ``refine_steps``, ...); ``n_pos`` is ``ds.n_pos``.

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
    return choose_beta(model, iv, ds, beta, **kwargs)[0]


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
    """Fig. 9: each attribution's fixed-alpha ActivScalar (raw scores, beta swept on
    ``train_ds`` by default) next to ``trained``, one row each: ``method``, ``beta`` (the
    chosen one; 1 for the trained one), E_0 (``*_effectiveness``) and F (``*_faithfulness``)
    on train and test, ``minimality`` (count of |beta alpha| > 0.01), ``n_params``, and
    ``train_effectiveness_at_1`` (E_0 of the scores as given, beta = +-1: Fig. 9's middle
    row). ``kwargs`` as in ``attribution_scalars`` (``beta="fit"``, ``normalize=True``, ...).
    """
    conv = {k: kwargs.pop(k) for k in ("site", "sites", "normalize", "orient") if k in kwargs}
    mode = kwargs.pop("beta", "sweep")
    fitted = {}
    for name, result in results.items():
        iv = scalars_from_result(model, result, **_lengths(train_ds, result), **conv)
        scaled, table = choose_beta(model, iv, train_ds, mode, **kwargs)
        at_1 = table.loc[table["beta"] == 1.0, "effectiveness"]
        fitted[name] = (scaled, float(table.loc[table["chosen"], "beta"].iloc[0]), float(at_1.iloc[0]) if len(at_1) else np.nan)
    fitted[f"{type(trained).__name__} (trained)"] = (trained, 1.0, np.nan)
    rows = []
    for name, (iv, beta, e_at_1) in fitted.items():
        s = evaluate_splits(model, iv, train_ds, test_ds, batch_size=kwargs.get("batch_size", 32))
        rows.append({
            "method": name, "beta": beta,
            **{f"{split}_{m}": s[split][m] for split in ("train", "test") for m in ("effectiveness", "faithfulness")},
            "minimality": s["train"]["minimality"], "n_params": s["train"]["n_params"],
            "train_effectiveness_at_1": s["train"]["effectiveness"] if np.isnan(e_at_1) else e_at_1,
        })
    return pd.DataFrame(rows)
