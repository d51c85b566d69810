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
from torch import Tensor

from mechsteer import runs
from mechsteer._validate import check_finite
from mechsteer.attribution import _atp_core as core
from mechsteer.attribution._common import Metric
from mechsteer.attribution.result import AttributionResult
from mechsteer.sites import sites_for
from mechsteer.tasks.base import ContrastiveDataset

ATP_SITES = sites_for("patch")
DIRECTIONS = core.DIRECTIONS
VARIANTS = ("atp", "atp*", "ig")  # plain, AtP* (QK fix + GradDrop, atp_star.py), path-integrated (atp_ig.py)


def attribution_patching_all(
    model,
    ds: ContrastiveDataset,
    *,
    sites: Sequence[str] | str = ("resid_pre", "attn_out", "mlp_out", "z"),
    direction: str = "noising",  # "noising" | "denoising" (str, so a typo gets our ValueError)
    metric: Metric | None = "logit_diff",
    per_prompt: bool = False,
    variant: str = "atp",  # "atp" | "atp*" (atp_star.py) | "ig" (atp_ig.py)
    steps: int = 4,  # variant="ig" only: points on the path
    positions: str = "auto",  # position axis: "auto" | "tokens" | "named" | "end" (mechsteer.tasks.positions)
    head_totals: bool = False,  # site z: each head summed over every token of each prompt, axes (layer, head)
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

    Prompts of different lengths (a right-padded dataset) are fine: each prompt's metric
    is read at its own last token, and its estimates at token positions are put on the
    ``positions`` axis (``"auto"``: token positions for equal lengths, else the dataset's
    named positions, else end-relative ``end-k .. end``; ``mechsteer.tasks.positions``),
    each entry averaged over the prompts that have it. Pads get exactly 0 (a causal model's
    metric at a prompt's last token has no gradient at the pads after it).
    ``head_totals=True`` sums site ``z`` over every token of each prompt before averaging
    (axes ``("layer", "head")``): on prompts of different lengths ``result.sum("pos")``
    of a per-position axis is not that total (its entries average different prompts).

    ``variant="atp*"`` runs ``atp_star.atp_star_all`` (QK fix and GradDrop, Kramár et al.
    2024; sites ``attn_out``, ``mlp_out``, ``z``, ``q``, ``k``) and ``variant="ig"`` runs
    ``atp_ig.atp_ig_all`` with ``steps`` gradients along the clean-to-corrupted path; same
    result type, scale and direction.

    >>> from mechsteer.tiny import tiny_model
    >>> from mechsteer.tasks import ioi
    >>> model = tiny_model("gpt2"); ds = ioi(model, n=4)
    >>> out = attribution_patching_all(model, ds, sites=("attn_out", "z"))
    >>> out["attn_out"].axes, out["z"].axes
    (('layer', 'pos'), ('layer', 'head', 'pos'))
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}.")
    if variant == "atp*":
        from mechsteer.attribution.atp_star import atp_star_all

        return atp_star_all(model, ds, sites=sites, direction=direction, metric=metric, per_prompt=per_prompt,
                            positions=positions, head_totals=head_totals)
    if variant == "ig":
        from mechsteer.attribution.atp_ig import atp_ig_all

        return atp_ig_all(model, ds, sites=sites, direction=direction, metric=metric, per_prompt=per_prompt,
                          steps=steps, positions=positions, head_totals=head_totals)
    run = core.setup(model, ds, sites, ATP_SITES, direction, metric, per_prompt, positions)
    names = {s: [(s, layer) for layer in range(model.cfg.n_layers)] for s in run.sites}
    flat = [n for s in run.sites for n in names[s]]

    with runs.timer() as t, runs.float32_logits(model):
        m_base, acts, grads = runs.grad_at(model, run.base, flat, run.values)
        with torch.no_grad():
            logits, acts_other = runs.cache_at(model, run.other, flat)
        m_clean, m_corr = run.clean_corr(m_base, run.values(logits), "attribution_patching")
        out: dict[str, tuple[Tensor, Tensor | None]] = {}
        for s in run.sites:
            # first-order change of the (per-prompt or custom) metric, per prompt and cell
            # (B, L, pos), or (B, L, H, pos) for z
            raw = runs.gather([core.dot(grads[n], acts_other[n], acts[n]) for n in names[s]], 1)
            totals = s == "z" and head_totals
            scores, pp = run.normalise(raw.sum(-1) if totals else raw, m_clean, m_corr, per_prompt,
                                       None if totals else run.axis)
            out[s] = (check_finite(f"attribution_patching: scores at site {s!r}", scores), pp)
    meta = run.meta(m_clean, m_corr)
    return {
        s: AttributionResult(
            scores=scores,
            axes=core.axes_of(s, head_totals),
            method="atp",
            metric=run.metric_name,
            labels={} if s == "z" and head_totals else {"pos": run.axis.labels},
            seconds=t["seconds"],
            per_prompt=pp,
            meta={**meta, "site": s},
        )
        for s, (scores, pp) in out.items()
    }


def attribution_patching(
    model,
    ds: ContrastiveDataset,
    *,
    site: str = "attn_out",
    direction: str = "noising",
    metric: Metric | None = "logit_diff",
    per_prompt: bool = False,
    variant: str = "atp",
    steps: int = 4,
    positions: str = "auto",
) -> AttributionResult:
    """AtP scores of one site; see ``attribution_patching_all`` and the module docstring.
    ``variant="atp*"`` (QK fix + GradDrop) or ``"ig"`` (``steps`` path points) as there.

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
        model, ds, sites=(site,), direction=direction, metric=metric, per_prompt=per_prompt, variant=variant,
        steps=steps, positions=positions,
    )[site]
