"""Path-integrated attribution patching (AtP-IG): AtP with the gradient averaged along the
path from the clean to the corrupted run.

AtP uses the gradient at one end of the path, c_AtP(n) = (n' - n)^T dm/dn |clean. Where m
bends between the two runs (a saturated softmax, a norm), that one gradient misleads.
Integrated gradients (Sundararajan et al. 2017) average it over the path instead; the
AtP* paper (Kramár et al. 2024) evaluates this as a baseline, and EAP-IG (Hanna et al.
2024) uses the same path for edges:

    c_IG(n) = (n' - n)^T * 1/K * sum_{k=0}^{K-1} dm/dn |x(k/K),
    x(alpha): the run whose token embeddings are e + alpha (e' - e)

(e: the embeddings of the run being patched, e': of the other run). One forward+backward
per point gives the gradient at every requested site, so the cost is K forward+backward
passes and one forward, whatever the sites. ``steps=1`` is AtP (alpha = 0 only). The
estimate is exact in the limit where the path of a node is the straight line from n to
n': at the embeddings themselves (``resid_pre`` of layer 0 when prompts differ in single
tokens), the left Riemann sum converges to real patching as K grows.

Same scale, direction and sites as AtP (``atp.py``); ``result.method`` is ``"atp-ig"``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from mechsteer import runs
from mechsteer._validate import check_finite, positive_int
from mechsteer.precision import wide
from mechsteer.attribution import _atp_core as core
from mechsteer.attribution._common import Metric
from mechsteer.attribution.result import AttributionResult
from mechsteer.sites import hook_name, hooked, sites_for
from mechsteer.tasks.base import ContrastiveDataset

IG_SITES = sites_for("patch")


def atp_ig_all(
    model,
    ds: ContrastiveDataset,
    *,
    sites: Sequence[str] | str = ("attn_out", "mlp_out", "z"),
    direction: str = "noising",  # as AtP: the path starts at the run being patched
    metric: Metric | None = "logit_diff",
    per_prompt: bool = False,
    steps: int = 4,  # K: points on the path (left Riemann sum; 1 = AtP)
    positions: str = "auto",  # position axis, as AtP's ("auto" | "tokens" | "named" | "end")
    head_totals: bool = False,  # site z: each head summed over every token of each prompt, as AtP's
) -> dict[str, AttributionResult]:
    """AtP-IG scores of every site in ``sites`` from ``steps`` forward+backward passes.

    >>> from mechsteer.tiny import tiny_model
    >>> from mechsteer.tasks import ioi
    >>> model = tiny_model("gpt2"); ds = ioi(model, n=4)
    >>> out = atp_ig_all(model, ds, sites=("attn_out", "z"), steps=2)
    >>> out["z"].method, out["z"].axes, out["z"].meta["steps"]
    ('atp-ig', ('layer', 'head', 'pos'), 2)
    """
    run = core.setup(model, ds, sites, IG_SITES, direction, metric, per_prompt, positions)
    steps = positive_int("steps", steps)
    names = {s: [(s, layer) for layer in range(model.cfg.n_layers)] for s in run.sites}
    flat = [n for s in run.sites for n in names[s]]
    with runs.timer() as t, runs.float32_logits(model):
        with torch.no_grad():
            logits, acts_other = runs.cache_at(model, run.other, [*flat, hook_name("embed")])
        e_other = acts_other[hook_name("embed")]
        total: dict = {}
        for k in range(steps):
            alpha = k / steps
            value, acts, grads = _grad_on_path(model, run, flat, e_other, alpha)
            if k == 0:
                m_base, acts_base = value, acts
            for n in flat:
                total[n] = wide(grads[n]) if k == 0 else total[n] + grads[n]  # summed in float32
        m_clean, m_corr = run.clean_corr(m_base, run.values(logits), "attribution_patching (atp-ig)")
        out = {}
        for s in run.sites:
            raw = runs.gather([core.dot(total[n] / steps, acts_other[n], acts_base[n]) for n in names[s]], 1)
            totals = s == "z" and head_totals
            scores, pp = run.normalise(raw.sum(-1) if totals else raw, m_clean, m_corr, per_prompt,
                                       None if totals else run.axis)
            out[s] = (check_finite(f"atp-ig: scores at site {s!r}", scores), pp)
    meta = {**run.meta(m_clean, m_corr), "steps": steps}
    return {
        s: AttributionResult(
            scores=sc, axes=core.axes_of(s, head_totals), method="atp-ig", metric=run.metric_name,
            labels={} if s == "z" and head_totals else {"pos": run.axis.labels}, seconds=t["seconds"], per_prompt=pp,
            meta={**meta, "site": s},
        )
        for s, (sc, pp) in out.items()
    }


def _grad_on_path(model, run, flat, e_other: Tensor, alpha: float):
    """Activations and gradients at ``flat`` on the run whose embeddings are moved a
    fraction ``alpha`` of the way to the other run's (alpha = 0: the run itself)."""
    if alpha == 0:
        return runs.grad_at(model, run.base, flat, run.values)

    def move(x, hook):
        return x + alpha * (e_other - x)

    with hooked(model, [(hook_name("embed"), move)]):
        return runs.grad_at(model, run.base, flat, run.values)
