"""What every AtP variant shares: argument checks, the metric it differentiates, the
feature-axis dot product and the normalisation to the activation-patching scale.

Plain AtP (``atp.py``), AtP* (``atp_star.py``) and path-integrated AtP (``atp_ig.py``) all
produce a first-order change of the metric per prompt and cell (``raw``, ``(B, *cells)``)
and turn it into a score exactly as activation patching does:

- noising: score = -raw / (m_clean - m_corr)   (the estimate of (m_clean - m_patched) / gap)
- denoising: score = raw / (m_clean - m_corr)

with the mean over prompts for the default metric (per-prompt logit differences) and the
sum of per-prompt terms for a custom scalar metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from jaxtyping import Float
from torch import Tensor

from mechsteer.attribution._common import check_dataset, on_axis, per_prompt_on_axis, position_axis
from mechsteer.metrics import check_metric_output, check_metric_values, per_prompt_metric, resolve_metric
from mechsteer.precision import wide
from mechsteer.sites import check_sites
from mechsteer.tasks.base import ContrastiveDataset

DIRECTIONS = ("noising", "denoising")


def metric_values(logits: Tensor, ds: ContrastiveDataset, metric) -> Tensor:
    """Per-prompt values ``(B,)`` of the default metric (differentiated as their sum, so
    each prompt keeps its own gradient), or the custom metric's scalar."""
    if metric is None:
        return per_prompt_metric(logits, ds)  # (B,)
    return check_metric_output(metric(logits, ds), name="custom metric")


def gap(clean: Tensor, corrupted: Tensor, what: str) -> Tensor:
    """clean - corrupted; ValueError where they are equal (nothing to normalise by)."""
    out = clean - corrupted
    if (out.abs() < 1e-8).any():
        raise ValueError(
            f"Cannot normalise AtP scores: the clean and corrupted {what} are equal "
            f"(clean {clean.tolist()}, corrupted {corrupted.tolist()}); the task does not separate them."
        )
    return out


def dot(
    grad: Float[Tensor, "batch pos *feat"], other: Float[Tensor, "batch pos *feat"], base: Float[Tensor, "batch pos *feat"]
) -> Float[Tensor, "batch *cells"]:
    """grad . (other - base) over the last (feature) axis, in float32 (or wider) whatever
    the model's dtype; heads move in front of positions."""
    d = (wide(grad) * (wide(other) - wide(base))).sum(-1)  # (B, pos) or (B, pos, H)
    return d.transpose(1, 2) if d.ndim == 3 else d  # (B, H, pos)


def axes_of(site: str, head_totals: bool = False) -> tuple[str, ...]:
    """Result axes of an AtP site: heads per position for z/q/k (per head with
    ``head_totals`` for z), else layer x position."""
    if site == "z" and head_totals:
        return ("layer", "head")
    return ("layer", "head", "pos") if site in ("z", "q", "k") else ("layer", "pos")


@dataclass(frozen=True)
class Setup:
    """A checked AtP call: the sites, the metric, the two token sets and the sign."""

    ds: ContrastiveDataset
    sites: list[str]
    direction: str
    metric: Callable | None
    metric_name: str
    base: Tensor  # the run differentiated (clean for noising)
    other: Tensor  # the run whose activations are patched in
    sign: float
    axis: object  # the PositionAxis of per-position results (mechsteer.tasks.positions)

    def values(self, logits: Tensor) -> Tensor:
        return metric_values(logits, self.ds, self.metric)

    def clean_corr(self, m_base: Tensor, m_other: Tensor, who: str) -> tuple[Tensor, Tensor]:
        m_clean, m_corr = (m_base, m_other) if self.direction == "noising" else (m_other, m_base)
        check_metric_values(who, m_clean, m_corr)
        return m_clean, m_corr

    def normalise(
        self, raw: Tensor, m_clean: Tensor, m_corr: Tensor, per_prompt: bool, axis=None
    ) -> tuple[Tensor, Tensor | None]:
        """``raw`` ``(B, *cells)`` first-order metric changes -> (scores, per-prompt scores).

        With a position ``axis`` the last axis of ``raw`` is token positions: each entry
        takes the mean (default metric) or sum (custom metric) over the prompts that have
        it, still divided by the whole dataset's clean-minus-corrupted gap."""
        reduce = (lambda x, how: x.mean(0) if how == "mean" else x.sum(0)) if axis is None else (  # noqa: E731
            lambda x, how: on_axis(x, axis, -1, how=how))
        if self.metric is None:
            scores = self.sign * reduce(raw, "mean") / gap(m_clean.mean(), m_corr.mean(), "mean logit differences")
        else:
            scores = self.sign * reduce(raw, "sum") / gap(m_clean, m_corr, "metric values")
        pp = None
        if per_prompt:
            g = gap(m_clean, m_corr, "logit differences of some prompts")
            pp = self.sign * raw / g.reshape(-1, *[1] * (raw.ndim - 1))
            pp = pp if axis is None else per_prompt_on_axis(pp, axis, -1)
        return scores, pp

    def meta(self, m_clean: Tensor, m_corr: Tensor) -> dict:
        return {"direction": self.direction, "clean_metric": float(m_clean.mean()),
                "corrupted_metric": float(m_corr.mean()), "sites_in_run": list(self.sites)}


def setup(model, ds, sites, allowed, direction, metric, per_prompt, positions: str = "auto") -> Setup:
    """Check an AtP call's arguments (ValueError/TypeError naming the fix) and resolve them."""
    check_dataset(ds, model=model)
    axis = position_axis(ds, positions)
    sites = check_sites(sites, allowed, name="sites")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'noising' or 'denoising', got {direction!r}.")
    metric, name = resolve_metric(metric)
    if per_prompt and metric is not None:
        raise ValueError("per_prompt=True needs the default metric (per-prompt logit difference); drop metric=.")
    ds = ds.to(model.cfg.device)
    base, other = (ds.tokens, ds.corrupted_tokens) if direction == "noising" else (ds.corrupted_tokens, ds.tokens)
    return Setup(ds, sites, direction, metric, name, base, other, -1.0 if direction == "noising" else 1.0, axis)
