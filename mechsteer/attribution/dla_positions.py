"""Per-position direct logit attribution: DLA over (layer, token position).

Paper 003 (Sec. 6.1, Fig. 9) reuses DLA scores as activation scalars alpha_{l,i}^(s) of
Eq. 5 for the sites attnOut and mlpOut at *every* layer l and token position i, and draws
them as layer x position heatmaps. ``direct_logit_attribution`` reads only the last
position's residual stream; ``dla_per_position`` gives a score at every position, in one
of two readings (``mode``). With r = (W_U[:, c] - W_U[:, w]) / s the logit-difference
direction divided by the final norm's scale s (mean-centred on LayerNorm models; W_U[:, c]
alone for ``metric="logit"``) and h_{l,i}^(s) the activation vector of site s:

- ``mode="vectors"`` (Fig. 9: DLA "identifies activation vectors whose directions are
  correlated with the vectors of the answer tokens in the projection matrix", one score
  per activation vector): score(l, i) = h_{l,i}^(s) . r_i, each position's own output
  read through the unembedding with its own final-norm scale s_i (the logit lens; what
  TransformerLens' ``apply_ln_to_stack`` does on every position). ``attn_out`` includes
  b_O (the vector Eq. 5 scales); ``z`` gives each head's z_{i,h} W_O[h] . r_i, axes
  ``("layer", "head", "pos")``. Only the last column is a term of the model's logits:
  there it equals ``direct_logit_attribution`` (heads: exactly its ``z`` scores;
  ``attn_out``: their sum plus the b_O term; ``mlp_out``: the MLP term). Other columns
  say what a position's output *would* do to the logits, not what it does.
- ``mode="sources"`` (the last position's direct effect split over the source positions
  k it attends to): a head's output at the last position is z_h = sum_k A_h[last, k]
  v_{k,h}, so its direct term z_h W_O[h] . r splits into A_h[last, k] v_{k,h} W_O[h] . r.
  ``z``: per head and source, axes ``("layer", "head", "pos")``, summing over pos to
  ``direct_logit_attribution(site="z")`` exactly; ``attn_out``: summed over heads (the
  same as ``direct_logit_attribution(site="attn_out")``, b_O left out: it has no
  source); ``mlp_out``: nonzero only at the last position (an MLP sees one position).

Post-sublayer norms (Gemma-2/3) are frozen at their scale at each position, as in
``dla.py``. Prompts of different lengths (right padding): every score is read at the
prompt's own positions, pads score exactly 0, and the pos axis follows ``positions``
(``mechsteer.tasks.positions``). Which mode the paper's figure used is not stated; the
vectors reading is the one under which mlpOut can highlight a token such as *London*
(under sources every mlpOut column but the last is 0).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from mechsteer import runs
from mechsteer._validate import check_finite
from mechsteer.attribution._common import Metric, on_axis, per_prompt_on_axis, position_axis
from mechsteer.attribution.dla import POST_NORM, _check, _head_scores, _run_dla
from mechsteer.attribution.result import AttributionResult
from mechsteer.sites import has_site
from mechsteer.tasks.base import ContrastiveDataset

MODES = ("vectors", "sources")
SITES = ("z", "attn_out", "mlp_out")  # z: per head; a list of the other two stacks on a "site" axis


def _readout(model, ds: ContrastiveDataset, metric: str, cache: dict, dev, dt) -> Tensor:
    """``(B, T, d_model)``: the logit direction over the final-norm scale at each position."""
    W_U = model.W_U.to(device=dev, dtype=dt)
    direction = W_U[:, ds.correct.to(dev)].T  # (B, d_model)
    if metric == "logit_diff":
        direction = direction - W_U[:, ds.wrong.to(dev)].T
    if model.cfg.normalization_type in ("LN", "LNPre"):  # LayerNorm centres x
        direction = direction - direction.mean(-1, keepdim=True)
    return direction[:, None] / cache[("final_scale", None)].to(device=dev, dtype=dt)  # (B, T, d)


def _vectors(model, ds: ContrastiveDataset, metric: str, sites: Sequence[str]) -> dict[str, Tensor]:
    """Per prompt in token coordinates: z (B, L, H, T), attn_out and mlp_out (B, L, T).
    Raises unless the last column equals the last-position DLA (whose terms are checked
    to add up to the model's own logits)."""
    cfg, L = model.cfg, model.cfg.n_layers
    post = has_site(model, POST_NORM)
    want = [("final_scale", None)] + [(s, l) for l in range(L) for s in ("z", "mlp_out")]
    want += [(POST_NORM, l) for l in range(L)] if post else []
    with torch.no_grad(), runs.float32_logits(model):
        logits, cache = runs.cache_at(model, ds.tokens.to(cfg.device), want)
    dev, dt = logits.device, torch.promote_types(logits.dtype, torch.float32)
    r = _readout(model, ds, metric, cache, dev, dt)
    heads, bias, mlp = [], [], []
    for layer in range(L):
        attn = model.blocks[layer].attn
        rg = r
        if post:  # frozen post-attention RMSNorm at each position: out = w ⊙ y / s_post
            w = model.blocks[layer].ln1_post.weight.to(device=dev, dtype=dt)
            w = 1 + w if getattr(cfg, "rmsnorm_uses_offset", False) else w
            rg = r * w / cache[(POST_NORM, layer)].to(device=dev, dtype=dt)
        u = torch.einsum("hed,btd->bthe", attn.W_O.to(device=dev, dtype=dt), rg)  # (B, T, H, e)
        heads.append(torch.einsum("bthe,bthe->bht", cache[("z", layer)].to(device=dev, dtype=dt), u))
        b_O = attn.b_O
        bias.append(rg @ b_O.to(device=dev, dtype=dt) if b_O is not None else torch.zeros_like(r[..., 0]))
        mlp.append((cache[("mlp_out", layer)].to(device=dev, dtype=dt) * r).sum(-1))  # (B, T)
    z = torch.stack(heads, 1)  # (B, L, H, T)
    real = (torch.arange(ds.n_pos, device=dev)[None] <= ds.last.to(dev)[:, None]).to(dt)  # (B, T): 0 at pads
    out = {"z": z * real[:, None, None], "attn_out": (z.sum(2) + torch.stack(bias, 1)) * real[:, None],
           "mlp_out": torch.stack(mlp, 1) * real[:, None]}
    run = _run_dla(model, ds, metric, sources=False)
    rows, last = torch.arange(len(ds), device=dev), ds.last.to(dev)
    heads = _head_scores(run).to(device=dev, dtype=dt)  # (B, L, H)
    expect = {"z": heads, "attn_out": heads.sum(-1) + run.attn_bias.to(dev, dt), "mlp_out": run.mlp.to(dev, dt)}
    for s, v in out.items():
        check_finite(f"dla_per_position: scores at site {s!r}", v)
        got, want = v[rows, ..., last], expect[s]  # (B, L[, H]) at each prompt's last token
        tol = 1e-4 * float(run.metric.abs().max().clamp(min=1))
        if not torch.allclose(got, want, rtol=1e-4, atol=tol):
            raise ValueError(f"dla_per_position: the last column of {s!r} misses the last-position DLA by "
                             f"{(got - want).abs().max().item():.3g}; this architecture is not one DLA describes.")
    return {s: out[s] for s in sites}


def _sources(model, ds: ContrastiveDataset, metric: str, sites: Sequence[str]) -> dict[str, Tensor]:
    """Per prompt: z (B, L, H, K) = A_h[last, k] v_{k,h} . u_h; attn_out (B, L, K); mlp_out
    (B, L, K) at the last position only. Keys after the last token have A = 0 (causal)."""
    run = _run_dla(model, ds, metric, sources=True)  # checks that the terms add up
    z = torch.einsum("blhk,blkhe,blhe->blhk", run.pattern, run.v, run.head_readout)
    mlp = torch.zeros(len(ds), model.cfg.n_layers, ds.n_pos, device=run.mlp.device, dtype=run.mlp.dtype)
    mlp[torch.arange(len(ds), device=mlp.device), :, ds.last.to(mlp.device)] = run.mlp
    out = {"z": z, "attn_out": z.sum(2), "mlp_out": mlp}
    return {s: out[s] for s in sites}


def dla_per_position(
    model,
    ds: ContrastiveDataset,
    *,
    site: str | Sequence[str] = ("attn_out", "mlp_out"),
    mode: str = "vectors",
    metric: Metric = "logit_diff",
    per_prompt: bool = False,
    positions: str = "auto",
) -> AttributionResult:
    """DLA at every (layer, position): ``mode="vectors"`` h_{l,i} . r_i (paper 003 Fig. 9)
    or ``mode="sources"`` the last position's direct term split over source positions.

    ``site``: ``"attn_out"`` or ``"mlp_out"`` (axes ``("layer", "pos")``), ``"z"`` (per
    head: ``("layer", "head", "pos")``), or a list of attn_out / mlp_out (axes ``("site",
    "layer", "pos")``, the default: Fig. 9's two panels, ready for
    ``interventions.scalars_from_result``). ``metric``: ``"logit_diff"`` (f_c - f_w) or
    ``"logit"`` (f_c). Scores in logits, averaged over prompts on the ``positions`` axis
    (``per_prompt=True`` keeps each prompt's). See the module docstring for both modes and
    the identities they satisfy (vectors: the last column is ``direct_logit_attribution``;
    sources: the sum over pos is).

    >>> from mechsteer.tiny import tiny_model
    >>> from mechsteer.tasks import ioi
    >>> model = tiny_model("llama"); ds = ioi(model, n=4)
    >>> fig9 = dla_per_position(model, ds)  # Fig. 9's DLA: attnOut and mlpOut at every position
    >>> fig9.axes, fig9.labels["site"]
    (('site', 'layer', 'pos'), ['attn_out', 'mlp_out'])
    >>> src = dla_per_position(model, ds, site="z", mode="sources", per_prompt=True)
    >>> from mechsteer.attribution import direct_logit_attribution
    >>> z = direct_logit_attribution(model, ds, site="z", per_prompt=True)
    >>> torch.allclose(src.per_prompt.sum(-1), z.per_prompt, atol=1e-5)
    True
    """
    _check(model, ds, metric)
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}.")
    one = isinstance(site, str)
    wanted = [site] if one else list(site) if isinstance(site, (list, tuple)) else None
    if not wanted or any(not isinstance(s, str) or s not in SITES for s in wanted) or len(set(wanted)) < len(wanted):
        raise ValueError(f"site must be one of {list(SITES)} or a list of distinct 'attn_out'/'mlp_out', got {site!r}.")
    if not one and "z" in wanted:
        raise ValueError("site='z' has a head axis and does not stack with attn_out / mlp_out; ask for it alone.")
    axis = position_axis(ds, positions)
    with runs.timer() as t:
        pp = (_vectors if mode == "vectors" else _sources)(model, ds, metric, wanted)
    for s, v in pp.items():
        check_finite(f"dla_per_position: scores at site {s!r}", v)
    meta = {"mode": mode, "post_norm": has_site(model, POST_NORM)}
    labels = {"pos": axis.labels}
    if one:
        ax = ("layer", "head", "pos") if site == "z" else ("layer", "pos")
        v = pp[site]
        return AttributionResult(scores=on_axis(v, axis), axes=ax, method="dla", metric=metric, labels=labels,
                                 seconds=t["seconds"], meta={**meta, "site": site},
                                 per_prompt=per_prompt_on_axis(v, axis) if per_prompt else None)
    v = torch.stack([pp[s] for s in wanted], 1)  # (B, S, L, T)
    return AttributionResult(scores=on_axis(v, axis), axes=("site", "layer", "pos"), method="dla", metric=metric,
                             labels={**labels, "site": wanted}, seconds=t["seconds"], meta=meta,
                             per_prompt=per_prompt_on_axis(v, axis) if per_prompt else None)
