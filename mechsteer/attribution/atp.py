"""Attribution patching (AtP): activation patching at the cost of one backward pass.

Activation patching runs the model once per location: it swaps one activation a between a
clean and a corrupted run and records the metric m. Attribution patching (Nanda 2023;
Syed et al. 2023; Kramár et al. 2024) replaces every one of those runs by a first-order
Taylor expansion around the run being patched:

    m(a <- a') - m(a)  ~=  grad_a m . (a' - a)

One forward+backward pass gives grad_a m at every requested location, and one extra
forward gives a' there; each location's estimate is then a dot product over the feature
axis (``d_model``, or ``d_head`` for site ``z``).

Two directions, scored on the same scale as activation patching:

- ``"noising"`` (default): gradient on the *clean* run, patch in the corrupted activation.
  score = (m_clean - m_patched) / (m_clean - m_corr)
        ~= -grad_clean . (a_corr - a_clean) / (m_clean - m_corr)
  1 means the location alone carries the whole clean-vs-corrupted difference.
- ``"denoising"``: gradient on the *corrupted* run, patch in the clean activation.
  score = (m_patched - m_corr) / (m_clean - m_corr)
        ~= grad_corr . (a_clean - a_corr) / (m_clean - m_corr)

Axes: residual-like sites (``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``,
``mlp_out``) give ``("layer", "pos")``; site ``z`` gives ``("layer", "head", "pos")``, one
score per head *and* position (call ``result.sum("pos")`` for per-head totals: the
estimate is linear, so patching a head at every position is the sum of its positions).

Caveats: the estimate is exact only where m is linear in the patched activation. It is
poor where the model saturates (attention patterns near 0 or 1, large LayerNorm scale
changes; e.g. ``resid_pre`` at early layers when a token embedding is swapped) and, by
construction, blind to interactions between locations. Use it to rank and shortlist;
confirm the top locations with real activation patching.

Cost: every requested site comes from the same two passes (one forward+backward on the
run being patched, one forward on the other), so asking for four sites costs about the
same as asking for one. The gradient is taken with respect to a zero tensor added at each
hook (``x + delta``, ``mechsteer.runs.grad_at``), so no model parameter needs
``requires_grad``.

``metric`` is a name of ``mechsteer.metrics.DATASET_METRICS`` (default ``"logit_diff"``)
or a callable ``metric(logits, ds) -> scalar``. Every prompt of ``ds`` runs in one
forward (there is no ``batch_size``: the two passes hold the whole dataset).
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechsteer import runs
from mechsteer._validate import check_finite
from mechsteer.attribution._common import Metric, check_dataset
from mechsteer.attribution.result import AttributionResult
from mechsteer.metrics import check_metric_output, check_metric_values, per_prompt_metric, resolve_metric
from mechsteer.sites import check_sites, sites_for
from mechsteer.tasks.base import ContrastiveDataset

ATP_SITES = sites_for("patch")
DIRECTIONS = ("noising", "denoising")


def _metric_values(logits: Tensor, ds: ContrastiveDataset, metric) -> Tensor:
    """Per-prompt values ``(B,)`` of the default metric (differentiated as their sum, so
    each prompt keeps its own gradient), or the custom metric's scalar."""
    if metric is None:
        return per_prompt_metric(logits, ds)  # (B,)
    return check_metric_output(metric(logits, ds), name="custom metric")


def _grad_pass(model, tokens: Tensor, keys: list, ds, metric) -> tuple[dict, dict, Tensor]:
    """Forward+backward on ``tokens``: activations and d(metric)/d(activation) at ``keys``."""
    values, acts, grads = runs.grad_at(model, tokens, keys, lambda logits: _metric_values(logits, ds, metric))
    return acts, grads, values


@torch.no_grad()
def _cache_pass(model, tokens: Tensor, keys: list, ds, metric) -> tuple[dict, Tensor]:
    """Plain forward on ``tokens``, storing the activations at ``keys`` only."""
    logits, acts = runs.cache_at(model, tokens, keys)
    return acts, _metric_values(logits, ds, metric)


def _gap(clean: Tensor, corrupted: Tensor, what: str) -> Tensor:
    gap = clean - corrupted
    if (gap.abs() < 1e-8).any():
        raise ValueError(
            f"Cannot normalise AtP scores: the clean and corrupted {what} are equal "
            f"(clean {clean.tolist()}, corrupted {corrupted.tolist()}); the task does not separate them."
        )
    return gap


def attribution_patching_all(
    model,
    ds: ContrastiveDataset,
    *,
    sites: Sequence[str] | str = ("resid_pre", "attn_out", "mlp_out", "z"),
    direction: str = "noising",  # "noising" | "denoising" (str, so a typo gets our ValueError)
    metric: Metric | None = "logit_diff",
    per_prompt: bool = False,
) -> dict[str, AttributionResult]:
    """AtP scores of every site in ``sites`` from one forward+backward and one forward.

    score(l, p) ~= -grad_clean m . (a_corr - a_clean) / (m_clean - m_corr) (noising) or
    grad_corr m . (a_clean - a_corr) / (m_clean - m_corr) (denoising); see the module
    docstring. ``metric``: a name of ``mechsteer.metrics.DATASET_METRICS`` or a callable
    ``metric(logits, ds) -> scalar`` in place of the mean logit difference;
    ``per_prompt=True`` (default metric only) also keeps each prompt's score, normalised
    by that prompt's own clean-minus-corrupted logit difference (``scores`` normalises the
    mean metric: it is the mean of ``per_prompt`` weighted by each prompt's gap, not the
    plain mean), as activation patching does. Every result's ``seconds`` is the time of
    the shared run; ``meta`` holds the direction and the clean and corrupted metric values.

    >>> from mechsteer.tiny import tiny_model
    >>> from mechsteer.tasks import ioi
    >>> model = tiny_model("gpt2"); ds = ioi(model, n=4)
    >>> out = attribution_patching_all(model, ds, sites=("attn_out", "z"))
    >>> out["attn_out"].axes, out["z"].axes
    (('layer', 'pos'), ('layer', 'head', 'pos'))
    """
    check_dataset(ds, model=model)
    sites = check_sites(sites, ATP_SITES, name="sites")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'noising' or 'denoising', got {direction!r}.")
    metric, metric_name = resolve_metric(metric)
    if per_prompt and metric is not None:
        raise ValueError("per_prompt=True needs the default metric (per-prompt logit difference); drop metric=.")
    device = model.cfg.device
    ds = ds.to(device)
    layers = range(model.cfg.n_layers)
    names = {s: [(s, layer) for layer in layers] for s in sites}
    flat = [n for s in sites for n in names[s]]
    base, other = (ds.tokens, ds.corrupted_tokens) if direction == "noising" else (ds.corrupted_tokens, ds.tokens)

    with runs.timer() as t:
        acts, grads, m_base = _grad_pass(model, base, flat, ds, metric)
        acts_other, m_other = _cache_pass(model, other, flat, ds, metric)
        m_clean, m_corr = (m_base, m_other) if direction == "noising" else (m_other, m_base)
        check_metric_values("attribution_patching", m_clean, m_corr)
        sign = -1.0 if direction == "noising" else 1.0
        out: dict[str, tuple[Tensor, Tensor | None]] = {}
        for s in sites:
            # first-order change of the (per-prompt or custom) metric, per prompt and cell
            # (B, L, pos), or (B, L, H, pos) for z
            raw = torch.stack([_dot(grads[n], acts_other[n] - acts[n]) for n in names[s]], 1)
            if metric is None:
                total = raw.mean(0)  # d(mean metric) = mean of per-prompt changes
                scores = sign * total / _gap(m_clean.mean(), m_corr.mean(), "mean logit differences")
            else:
                scores = sign * raw.sum(0) / _gap(m_clean, m_corr, "metric values")
            pp = None
            if per_prompt:
                gap = _gap(m_clean, m_corr, "logit differences of some prompts")
                pp = sign * raw / gap.reshape(-1, *[1] * (raw.ndim - 1))
            out[s] = (check_finite(f"attribution_patching: scores at site {s!r}", scores), pp)
    meta = {
        "direction": direction,
        "clean_metric": float(m_clean.mean()),
        "corrupted_metric": float(m_corr.mean()),
        "sites_in_run": list(sites),
    }
    return {
        s: AttributionResult(
            scores=scores,
            axes=("layer", "head", "pos") if s == "z" else ("layer", "pos"),
            method="atp",
            metric=metric_name,
            labels={"pos": ds.labels},
            seconds=t["seconds"],
            per_prompt=pp,
            meta={**meta, "site": s},
        )
        for s, (scores, pp) in out.items()
    }


def _dot(
    grad: Float[Tensor, "batch pos *feat"], diff: Float[Tensor, "batch pos *feat"]
) -> Float[Tensor, "batch *cells"]:
    """grad . diff over the last (feature) axis; heads move in front of positions."""
    d = (grad * diff).sum(-1)  # (B, pos) or (B, pos, H)
    return d.transpose(1, 2) if d.ndim == 3 else d  # (B, H, pos)


def attribution_patching(
    model,
    ds: ContrastiveDataset,
    *,
    site: str = "attn_out",
    direction: str = "noising",
    metric: Metric | None = "logit_diff",
    per_prompt: bool = False,
) -> AttributionResult:
    """AtP scores of one site; see ``attribution_patching_all`` and the module docstring.

    >>> from mechsteer.tiny import tiny_model
    >>> from mechsteer.tasks import ioi
    >>> model = tiny_model("llama"); ds = ioi(model, n=4)
    >>> r = attribution_patching(model, ds, site="z")
    >>> tuple(r.sum("pos").scores.shape)  # per-head totals: (layer, head)
    (2, 4)
    """
    if not isinstance(site, str):
        raise TypeError(
            f"site must be one site name (str), got {site!r}; for several sites use "
            f"attribution_patching_all(model, ds, sites=[...]) (sites {list(ATP_SITES)})."
        )
    return attribution_patching_all(
        model, ds, sites=(site,), direction=direction, metric=metric, per_prompt=per_prompt
    )[site]
