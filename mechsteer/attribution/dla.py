"""Direct logit attribution (DLA): each component's share of the last-position logits.

The residual stream at the last position is a sum of what every component wrote there:
x = embed (+ pos_embed) + sum_l (attn_l + mlp_l), and attn_l = sum_h z_h W_O[h] + b_O.
The final norm divides x by one scale s per prompt (``ln_final.hook_scale``; with
``fold_ln`` the norm's weight lives in W_U, and LayerNorm also subtracts the mean), and
the unembedding is linear. Freezing s at its value in the run (Elhage et al. 2021):

    f_c - f_w = sum_c (x_c / s) . (W_U[:, c] - W_U[:, w]) + (b_U[c] - b_U[w])

so every component c gets the exact, additive score (x_c / s) . (W_U[:, c] - W_U[:, w])
(x_c mean-centred first on LayerNorm models). Components are never re-normalised one by
one: the cached s is the one the real run used, which is what makes the terms add up.

Sites of ``direct_logit_attribution``:

- ``"z"``: one score per head, axes ``("layer", "head")``: head output z_h W_O[h] at the
  last position (b_O, which belongs to no head, is its own term in ``dla_terms``).
- ``"attn_out"``: axes ``("layer", "pos")`` where pos is the *source* position k that
  the last position attends to: sum_h A_h[last, k] v_{k,h} W_O[h]. Summed over pos it is
  the layer's attention output at the last position minus b_O.
- ``"mlp_out"``: axes ``("layer", "pos")``, the MLP output at each position. An MLP acts
  on one position, so only the last position's MLP writes into the last residual stream:
  every other column is exactly 0 (kept so the grid stacks with ``attn_out``).

``dla_terms`` lists every term (embedding, each head, each b_O, each MLP, the unembedding
bias), which add up to the logit difference of each prompt; all functions check that they
do, so an architecture this decomposition does not describe raises instead of returning
numbers that do not add up.

DLA measures only the *direct* path through the unembedding: a head that matters by
moving information for later layers can score 0. It needs no corrupted prompt.

Models with post-sublayer norms (Gemma-2/3: ``ln1_post``/``ln2_post`` normalise each
attention and MLP output before it is added to the residual stream): a head's output
passes RMSNorm together with the other heads', so its direct contribution is not linear
in its own output. mechsteer freezes that norm's scale too, as it does the final norm's:
a head's term is (w ⊙ z_h W_O[h] / s_post) / s . (W_U[:, c] - W_U[:, w]), w the norm's
(offset) weight, s_post its cached scale at the last position. These terms still add up
exactly, but read them as "share of the post-norm attention output", not as the effect
of the head alone. MLP terms use the normalised output that enters the residual stream.
Such models are recognised by their ``blocks.{l}.ln1_post`` hooks (TransformerLens 4.3's
Gemma-3 bridge leaves ``cfg.use_normalization_before_and_after`` False); results carry
``meta["post_norm"]``. TransformerLens' own per-head DLA skips the post norm there, so
its head terms do not add up to its attention terms. Models that soft-cap their logits
are refused.

``metric="logit"`` explains the correct answer's logit f_c alone (direction W_U[:, c]).
Only metrics linear in the logits decompose this way: other names of
``mechsteer.metrics.DATASET_METRICS`` (``"answer_prob"``) and callables are refused. All
prompts of the dataset run in one forward pass (there is no ``batch_size``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mechsteer import runs
from mechsteer._validate import check_finite
from mechsteer.attribution._common import (
    Metric,
    check_dataset,
    check_linear_metric,
    on_axis,
    per_prompt_on_axis,
    position_axis,
)
from mechsteer.attribution.result import AttributionResult
from mechsteer.metrics import logit_diff
from mechsteer.precision import model_dtype
from mechsteer.sites import check_sites, has_site, sites_for
from mechsteer.tasks.base import ContrastiveDataset

DLA_SITES = sites_for("dla")
DEFAULT_SITES = ("z", "attn_out", "mlp_out")
DLA_METRICS = ("logit_diff", "logit")  # the metrics linear in the last-position logits
POST_NORM = "ln1_post_scale"  # Gemma-2/3 style post-attention norm
SITE_HINTS = {s: " (use 'attn_out' or 'mlp_out' for layer x position)" for s in ("resid_pre", "resid_post")}


@dataclass
class DLARun:
    """What one forward pass leaves for DLA, all at the last position (B prompts, L
    layers, H query heads, K positions, e = d_head). Direct terms are in logits."""

    z: Tensor  # (B, L, H, e) head values before W_O
    head_readout: Tensor  # (B, L, H, e) u_h = W_O[h] (g ⊙ r): z_h . u_h is head h's term
    mlp: Tensor  # (B, L) MLP terms
    attn_bias: Tensor  # (B, L) b_O terms (0 without b_O)
    embed: Tensor  # (B,)
    pos_embed: Tensor | None  # (B,) learned positions only
    unembed_bias: Tensor  # (B,) b_U[c] - b_U[w] (or b_U[c])
    metric: Tensor  # (B,) the model's own f_c - f_w (or f_c)
    post_norm: bool
    pattern: Tensor | None = None  # (B, L, H, K) A[last, k]
    v: Tensor | None = None  # (B, L, K, H, e) values, repeated to query heads on GQA models


def _check(model, ds: ContrastiveDataset, metric: Metric) -> None:
    check_dataset(ds, model=model)
    check_linear_metric(metric, "DLA")
    if not isinstance(metric, str):
        raise TypeError(
            f"DLA splits the logits into linear terms, so it explains only metrics linear in them: metric must "
            f"be one of {list(DLA_METRICS)}, got {metric!r}. For other metrics use activation_patching or "
            "attribution_patching."
        )
    if metric not in DLA_METRICS:
        raise ValueError(
            f"metric must be one of {list(DLA_METRICS)} for DLA (metrics linear in the logits), got {metric!r}."
        )
    cfg = model.cfg
    if (getattr(cfg, "output_logits_soft_cap", 0) or 0) > 0:
        raise ValueError(
            f"This model soft-caps its logits (output_logits_soft_cap={cfg.output_logits_soft_cap}): "
            "logits are not linear in the residual stream, so DLA terms cannot add up to them."
        )
    post = has_site(model, POST_NORM)
    if getattr(cfg, "use_normalization_before_and_after", False) and not post:
        raise ValueError("This model normalises sublayer outputs, but exposes no ln1_post hooks; DLA cannot read them.")
    if post and cfg.normalization_type not in ("RMS", "RMSPre"):
        raise ValueError(
            f"DLA supports post-sublayer norms of RMSNorm type only; this model uses {cfg.normalization_type}."
        )


def _run_dla(model, ds: ContrastiveDataset, metric: str, *, sources: bool) -> DLARun:
    """One forward pass caching only the last position's component outputs (plus the
    last query row of every attention pattern and the values when ``sources``). The last
    position is each prompt's own last token (``ds.answer_pos``: -1 unless padded)."""
    cfg, L = model.cfg, model.cfg.n_layers
    ds = ds.to(cfg.device)
    post = has_site(model, POST_NORM)
    pos = ds.answer_pos
    rows = torch.arange(len(ds), device=cfg.device)
    if isinstance(pos, Tensor):
        _last = lambda x: x[rows, pos]  # noqa: E731  (B, ...) at each prompt's last token
        _query_row = lambda x: x[rows, :, pos]  # noqa: E731  (B, H, K)
    else:
        _last = lambda x: x[:, -1]  # noqa: E731
        _query_row = lambda x: x[:, :, -1]  # noqa: E731
    # (site, layer) -> what to keep of it: the last position (pattern: its query row)
    want = {("embed", None): _last, ("final_scale", None): _last}
    if has_site(model, "pos_embed"):
        want[("pos_embed", None)] = _last
    for layer in range(L):
        want[("z", layer)] = _last
        want[("mlp_out", layer)] = _last
        if post:
            want[(POST_NORM, layer)] = _last
        if sources:
            want[("pattern", layer)] = _query_row  # (B, H, K)
            want[("v", layer)] = None  # every position
    with torch.no_grad(), runs.float32_logits(model):
        logits, cache = runs.cache_at(model, ds.tokens, want, keep=want)
    f_last = logits[:, -1] if not isinstance(pos, Tensor) else logits[rows.to(logits.device), pos.to(logits.device)]
    check_finite("DLA: the model's last-position logits", f_last)  # (B, vocab)
    dt = torch.promote_types(logits.dtype, torch.float32)  # dot products in >= float32
    dev = f_last.device  # the unembedding's: every term is read there (device_map splits layers)
    f = lambda site, layer=None: cache[(site, layer)].to(device=dev, dtype=dt)  # noqa: E731
    W_U, b_U = model.W_U.to(device=dev, dtype=dt), None if model.b_U is None else model.b_U.to(dev)
    correct, wrong = ds.correct.to(dev), ds.wrong.to(dev)
    direction = W_U[:, correct].T  # (B, d_model)
    if metric == "logit_diff":
        direction = direction - W_U[:, wrong].T
        actual = logit_diff(f_last, correct, wrong, reduce="none")
        ub = b_U[correct] - b_U[wrong] if b_U is not None else None
    else:
        actual = f_last.gather(1, correct[:, None])[:, 0]
        ub = b_U[correct] if b_U is not None else None
    if cfg.normalization_type in ("LN", "LNPre"):  # LayerNorm centres x: (x - mean x) . d = x . (d - mean d)
        direction = direction - direction.mean(-1, keepdim=True)
    r = direction / f("final_scale")  # (B, d_model) readout of the residual stream
    readout, bias = [], []
    for layer in range(L):
        attn = model.blocks[layer].attn
        rg = r
        if post:  # frozen post-attention RMSNorm: out = w ⊙ y / s_post
            w = model.blocks[layer].ln1_post.weight.to(device=dev, dtype=dt)
            w = 1 + w if getattr(cfg, "rmsnorm_uses_offset", False) else w
            rg = r * w / f(POST_NORM, layer)
        readout.append(torch.einsum("hed,bd->bhe", attn.W_O.to(device=dev, dtype=dt), rg))  # (B, H, e)
        bias.append(rg @ attn.b_O.to(device=dev, dtype=dt) if attn.b_O is not None else torch.zeros(len(ds), dtype=dt, device=r.device))
    dot = lambda site, layer=None: (f(site, layer) * r).sum(-1)  # noqa: E731
    run = DLARun(
        z=torch.stack([f("z", layer) for layer in range(L)], 1),
        head_readout=torch.stack(readout, 1),
        mlp=torch.stack([dot("mlp_out", layer) for layer in range(L)], 1),
        attn_bias=torch.stack(bias, 1),
        embed=dot("embed"),
        pos_embed=dot("pos_embed") if ("pos_embed", None) in want else None,
        unembed_bias=ub.to(dt) if ub is not None else torch.zeros(len(ds), dtype=dt, device=r.device),
        metric=actual.to(dt),
        post_norm=post,
    )
    if sources:
        run.pattern = torch.stack([f("pattern", layer) for layer in range(L)], 1)
        v = torch.stack([f("v", layer) for layer in range(L)], 1)  # (B, L, K, H_kv, e)
        run.v = v.repeat_interleave(cfg.n_heads // v.shape[3], dim=3)
    _check_sum(run, _head_scores(run), model_dtype(model))
    return run


def sum_tolerance(
    terms: Float[Tensor, "batch n"], metric: Float[Tensor, " batch"], dtype: torch.dtype
) -> Float[Tensor, " batch"]:
    """How far a prompt's direct terms may miss its metric: 1e-3 x max(1, |metric|) in
    float32; in half precision 2 u sum_c |term_c|, u = eps / 2 the unit roundoff (2^-8 for
    bf16's 8 significant bits, 2^-11 for fp16): each term is rounded once when its
    component computes it and once more when the residual stream adds it (measured on
    SmolLM2 in bf16, 8 IOI prompts: at most 0.37 u sum_c |term_c|, about 0.04 logits)."""
    if dtype in (torch.float16, torch.bfloat16):
        return 2 * (torch.finfo(dtype).eps / 2) * terms.abs().sum(1)
    return 1e-3 * metric.abs().clamp(min=1.0)


def _check_sum(run: DLARun, heads: Tensor, dtype: torch.dtype) -> None:
    """Raise unless the direct terms add up to the model's own metric within
    ``sum_tolerance`` (any architecture this decomposition does not describe fails here
    rather than returning wrong numbers)."""
    parts = [run.embed[:, None], heads.flatten(1), run.attn_bias, run.mlp, run.unembed_bias[:, None]]
    if run.pos_embed is not None:
        parts.append(run.pos_embed[:, None])
    terms = torch.cat(parts, 1)  # (B, n_terms)
    err = (terms.sum(1) - run.metric).abs()
    tol = sum_tolerance(terms, run.metric, dtype)
    if not bool((err <= tol).all()):  # written so that a NaN error fails too (NaN <= tol is False)
        raise ValueError(
            f"DLA terms do not add up to the model's logits (max error {err.max().item():.3g}, tolerance "
            f"{tol.min().item():.3g}): this architecture puts something between the residual stream and the "
            "logits that DLA does not model."
        )


def _head_scores(run: DLARun) -> Float[Tensor, "batch layer head"]:
    """Each head's direct term: z_h . (W_O[h] (g ⊙ r)) at the last position."""
    return torch.einsum("blhe,blhe->blh", run.z, run.head_readout)


def _source_scores(run: DLARun) -> Float[Tensor, "batch layer pos"]:
    """Attention's direct term split by source position: sum_h A_h[last, k] v_{k,h} . u_h."""
    vals = torch.einsum("blkhe,blhe->blkh", run.v, run.head_readout)  # (B, L, K, H)
    return torch.einsum("blhk,blkh->blk", run.pattern, vals)


def direct_logit_attribution_all(
    model,
    ds: ContrastiveDataset,
    *,
    sites: tuple[str, ...] | list[str] = DEFAULT_SITES,
    metric: Metric = "logit_diff",
    per_prompt: bool = False,
    positions: str = "auto",  # position axis of attn_out / mlp_out: "auto" | "tokens" | "named" | "end"
) -> dict[str, AttributionResult]:
    """DLA of several sites from one forward pass (see ``direct_logit_attribution``).

    >>> from mechsteer.tiny import tiny_model
    >>> from mechsteer.tasks import ioi
    >>> model = tiny_model("llama")
    >>> sorted(direct_logit_attribution_all(model, ioi(model, n=2)))
    ['attn_out', 'mlp_out', 'z']
    """
    _check(model, ds, metric)
    sites = check_sites(sites, DLA_SITES, name="sites", hints=SITE_HINTS)
    axis = position_axis(ds, positions)
    scores = {}
    with runs.timer() as t:
        run = _run_dla(model, ds, metric, sources="attn_out" in sites)
        for site in sites:
            if site == "z":
                scores[site] = _head_scores(run)
            elif site == "attn_out":
                scores[site] = _source_scores(run)
            else:
                pp = torch.zeros(len(ds), model.cfg.n_layers, ds.n_pos, device=run.mlp.device, dtype=run.mlp.dtype)
                last = ds.last.to(pp.device)
                pp[torch.arange(len(ds), device=pp.device), :, last] = run.mlp  # (B, L) at each prompt's last
                scores[site] = pp
            check_finite(f"DLA: scores at site {site!r}", scores[site])
    return {
        site: AttributionResult(
            scores=pp.mean(0) if site == "z" else on_axis(pp, axis),
            axes=("layer", "head") if site == "z" else ("layer", "pos"),
            method="dla",
            metric=metric,
            labels={} if site == "z" else {"pos": axis.labels},
            seconds=t["seconds"],  # the shared run's time
            per_prompt=(pp if site == "z" else per_prompt_on_axis(pp, axis)) if per_prompt else None,
            meta={"site": site, "post_norm": run.post_norm},
        )
        for site, pp in scores.items()
    }


def direct_logit_attribution(
    model,
    ds: ContrastiveDataset,
    *,
    site: str = "z",
    metric: Metric = "logit_diff",
    per_prompt: bool = False,
    positions: str = "auto",
) -> AttributionResult:
    """Direct logit attribution at the last position: (x_c / s) . (W_U[:, c] - W_U[:, w]).

    ``site``: ``"z"`` (axes layer x head), ``"attn_out"`` (layer x source position) or
    ``"mlp_out"`` (layer x position, nonzero only at the last position); see the module
    docstring. ``metric``: ``"logit_diff"`` (f_c - f_w) or ``"logit"`` (f_c alone).
    Scores are in logits, averaged over prompts (``per_prompt=True`` keeps each prompt's).
    Prompts of different lengths are read at their own last token; ``positions`` picks
    the position axis of ``attn_out``/``mlp_out`` (``mechsteer.tasks.positions``).

    >>> from mechsteer.tiny import tiny_model
    >>> from mechsteer.tasks import ioi
    >>> model = tiny_model("llama"); ds = ioi(model, n=4)
    >>> r = direct_logit_attribution(model, ds, site="z")
    >>> r.axes, tuple(r.scores.shape)
    (('layer', 'head'), (2, 4))
    """
    if not isinstance(site, str):
        raise TypeError(
            f"site must be one site name (str), got {site!r}; for several sites use "
            f"direct_logit_attribution_all(model, ds, sites=[...]) (sites {list(DLA_SITES)})."
        )
    return direct_logit_attribution_all(model, ds, sites=(site,), metric=metric, per_prompt=per_prompt,
                                        positions=positions)[site]


def dla_terms(model, ds: ContrastiveDataset, *, metric: Metric = "logit_diff"):
    """Every direct term of every prompt, as a tidy DataFrame that sums to the metric.

    Columns: ``prompt``, ``term`` (``embed``, ``pos_embed`` where positions are learned,
    ``head``, ``attn_bias`` (b_O; 0 on models without it), ``mlp``, ``unembed_bias``),
    ``layer`` and ``head`` (nullable integers), ``label`` and ``value`` (logits).
    ``df.groupby("prompt")["value"].sum()`` is each prompt's f_c - f_w (or f_c).

    >>> from mechsteer.tiny import tiny_model
    >>> from mechsteer.tasks import ioi
    >>> model = tiny_model("gpt2"); ds = ioi(model, n=2)
    >>> df = dla_terms(model, ds)
    >>> total = df.groupby("prompt")["value"].sum()
    >>> torch.allclose(torch.tensor(total.values), ds.logit_diffs(model)[0].double(), atol=1e-4)
    True
    """
    import pandas as pd

    _check(model, ds, metric)
    run = _run_dla(model, ds, metric, sources=False)
    heads = _head_scores(run).cpu().double()  # (B, L, H)
    B, L, H = heads.shape
    rows: list[tuple] = []
    for b in range(B):
        rows.append((b, "embed", None, None, "embed", float(run.embed[b])))
        if run.pos_embed is not None:
            rows.append((b, "pos_embed", None, None, "pos_embed", float(run.pos_embed[b])))
        for layer in range(L):
            rows += [(b, "head", layer, h, f"L{layer}H{h}", float(heads[b, layer, h])) for h in range(H)]
            rows.append((b, "attn_bias", layer, None, f"L{layer} b_O", float(run.attn_bias[b, layer])))
            rows.append((b, "mlp", layer, None, f"L{layer} mlp", float(run.mlp[b, layer])))
        rows.append((b, "unembed_bias", None, None, "b_U", float(run.unembed_bias[b])))
    df = pd.DataFrame(rows, columns=["prompt", "term", "layer", "head", "label", "value"])
    return df.astype({"layer": "Int64", "head": "Int64"})
