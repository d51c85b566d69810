"""AtP*: attribution patching with the QK fix and GradDrop (Kramár, Lieberum, Shah, Nanda
2024, "AtP*: An efficient and scalable method for localizing LLM behaviour to components",
arXiv 2403.00745).

Activation patching measures, for a node n, c(n) = m(clean | do(n <- n(noise))) - m(clean);
AtP estimates it to first order, c_AtP(n) = (n(noise) - n(clean))^T dm/dn on the clean run
(see ``atp.py``). The paper finds two ways this misses important nodes (false negatives) and
fixes each while keeping the cost at a few passes:

**1. Attention saturation -> the QK fix.** A query or key changes the model only through its
head's attention scores, and the softmax after them saturates: where a row of the pattern
A is near one-hot its gradient is ~0, so a query or key that would move the attention a lot
gets an estimate of ~0. The QK fix computes the patched attention probabilities *exactly*
and linearises only from the pattern onward (the attention output is linear in A):

    query q_t:  c_Q(n) = (A'_t - A_t) . dm/dA_t,   A'_t = softmax(s_t(q_t <- q_t(noise)))
    key   k_s:  c_K(n) = sum_t (A'_t - A_t) . dm/dA_t,   A'_t = softmax(s_t + e_s (s'_ts - s_ts))

A patched query changes its own row of the scores; a patched key changes one column, for
every query that sees it (on grouped-query models, for every query head of its KV group).
Here A' of all queries comes from one extra forward (queries from the noise run, keys from
the clean run, at every layer); for keys, the score change s'_ts - s_ts is read from one
more forward as a log-probability difference against an anchor key (position 0, which
both runs share, e.g. BOS), so no model's score formula (rotary, scaling) is re-derived.
Written out, the key rule is c_K = sum_t w_ts (G_ts - sum_s' A_ts' G_ts') with
G = dm/dA and w = A (e^d - 1) / (1 + A (e^d - 1)), d = s'_ts - s_ts (``key_fix``).

The fix applies to *query and key nodes* (sites ``q``, ``k``). A head's output node
(site ``z``, one head at one position, or a whole head) has no softmax of its own to
linearise: AtP already uses its exact patched value, so there AtP* is AtP + GradDrop.

**2. Cancellation -> GradDrop.** A node's direct effect and its effect through later layers
can cancel in the gradient although a real patch changes the metric a lot. GradDrop
reruns the backward pass once per layer l with the gradient through layer l's residual
stream contribution (its attn_out and mlp_out) set to zero, giving c_l(n), and combines

    c_GD(n) = 1/(L-1) * sum_{l != layer(n)} |c_l(n)|

(dropping the node's own layer zeroes its estimate; dropping a layer below it changes
nothing, so c_l(n) = c_AtP(n) there). Only layers 1..L-1 need a backward pass: GradDrop
costs L-1 extra backward passes on the one stored forward. mechsteer keeps the AtP scale
and sign convention: scores are normalised per layer-drop exactly as AtP's (see
``atp.py``) and the combined magnitude takes the sign of the undropped estimate (the paper
ranks by magnitude only, so rankings are the paper's).

AtP* = QK fix + GradDrop. Cost: AtP's forward+backward and forward, L-1 more backward
passes, and for ``q``/``k`` two forwards without gradients.
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechsteer import runs
from mechsteer._validate import check_finite
from mechsteer.attribution import _atp_core as core
from mechsteer.attribution._common import Metric
from mechsteer.attribution.result import AttributionResult
from mechsteer.sites import check_sites, hook_name, hooked
from mechsteer.tasks.base import ContrastiveDataset

STAR_SITES = ("attn_out", "mlp_out", "z", "q", "k")
RULES = ("exact", "linear")
_RESID_HINT = (" AtP* scores the paper's nodes (attention and MLP outputs, heads, queries, keys); for the "
               "residual stream use variant='atp' or variant='ig'.")
_LOG_FLOOR = 1e-38  # probabilities that underflowed to 0 are read as this in log differences


# ---- rules ------------------------------------------------------------------------------
class _DropGrad(torch.autograd.Function):
    """Identity forward; backward passes zero while ``flag["on"]`` (read at backward time,
    so one stored forward serves every GradDrop backward pass)."""

    @staticmethod
    def forward(ctx, x, flag):
        ctx.flag = flag
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return (torch.zeros_like(g) if ctx.flag["on"] else g), None


def drop_grad(x: Tensor, flag: dict) -> Tensor:
    """GradDrop's rule at one layer output: same value, d/dx = 0 while ``flag["on"]``.
    Applied to attn_out and mlp_out of layer l, it removes every gradient path through
    layer l's residual-stream contribution (the c_l(n) term of GradDrop)."""
    return _DropGrad.apply(x, flag)


def query_fix(
    A: Float[Tensor, "batch head query_pos key_pos"], A_patched: Float[Tensor, "batch head query_pos key_pos"],
    G: Float[Tensor, "batch head query_pos key_pos"], rule: str = "exact",
) -> Float[Tensor, "batch head pos"]:
    """QK fix for every query node: c_Q(q_t) = (A'_t - A_t) . G_t, with A'_t the row the
    patched query gives (``rule="exact"``) or its first-order change J_t (log A'_t - log A_t)
    through the softmax Jacobian J = diag(A) - A A^T (``"linear"``: AtP's own linearisation)."""
    if rule == "exact":
        change = A_patched - A
    else:
        d = _log_diff(A_patched, A)  # score change up to a per-row constant (J ignores it)
        change = A * d - A * (A * d).sum(-1, keepdim=True)
    return (change * G).sum(-1)  # (B, H, T)


def key_fix(
    A: Float[Tensor, "batch head query_pos key_pos"], d: Float[Tensor, "batch head query_pos key_pos"],
    G: Float[Tensor, "batch head query_pos key_pos"], n_kv: int, rule: str = "exact",
) -> Float[Tensor, "batch kv_head pos"]:
    """QK fix for every key node: patching key s adds d_ts to column s of the scores, so
    A'_ts = A_ts e^d / Z_t and A'_ts' = A_ts' / Z_t with Z_t = 1 + A_ts (e^d - 1), and
    sum_s' (A'_ts' - A_ts') G_ts' = w_ts (G_ts - P_t), P_t = sum_s' A_ts' G_ts'. ``rule="exact"``:
    w = A (e^d - 1) / Z; ``"linear"``: w = A d (first order in d). Summed over queries t and
    over the query heads of each KV head (query head h reads KV head h // (H / n_kv))."""
    P = (A * G).sum(-1, keepdim=True)  # (B, H, T, 1)
    if rule == "exact":
        e = torch.expm1(d.clamp(max=600.0))
        w = A * e / (1 + A * e)
    else:
        w = A * d
    est = (w * (G - P)).sum(-2)  # (B, H, S): sum over queries t
    B, H, S = est.shape
    return est.view(B, n_kv, H // n_kv, S).sum(2)


def _log_diff(a: Tensor, b: Tensor) -> Tensor:
    """log a - log b where both rows are attended (b > 0), else 0 (masked entries)."""
    out = a.clamp_min(_LOG_FLOOR).log() - b.clamp_min(_LOG_FLOOR).log()
    return torch.where(b > 0, out, torch.zeros_like(out))


# ---- runs -------------------------------------------------------------------------------
def _drop_pass(model, tokens, keys, store, objective, drop_layers):
    """One forward with a zero delta at ``keys`` and GradDrop gates on the attn_out and
    mlp_out of ``drop_layers``, then one backward per entry of [None, *drop_layers] (None:
    nothing dropped). Returns (value, acts at keys, activations at ``store``, {l: grads})."""
    names = {k: hook_name(k[0], k[1], model) for k in [*keys, *store]}
    gates = {hook_name(s, l, model): l for l in drop_layers for s in ("attn_out", "mlp_out")}
    flags = {l: {"on": False} for l in drop_layers}
    acts, deltas, stored = {}, {}, {}

    def at(point):
        def fn(x, hook):
            for k in keys:
                if names[k] == point:
                    acts[k] = x.detach()
                    deltas[k] = torch.zeros_like(acts[k], requires_grad=True)
                    x = x + deltas[k]  # same value; d m / d delta = d m / d x
            for k in store:
                if names[k] == point:
                    stored[k] = x.detach()
            return drop_grad(x, flags[gates[point]]) if point in gates else x

        return fn

    points = list(dict.fromkeys([*names.values(), *gates]))
    with torch.enable_grad():
        with hooked(model, [(p, at(p)) for p in points]):
            logits = model(tokens)
        value = objective(logits)
        total, grads = value.sum(), {}
        for layer in [None, *drop_layers]:
            for l, f in flags.items():
                f["on"] = l == layer
            last = layer == (drop_layers[-1] if drop_layers else None)
            gs = torch.autograd.grad(total, [deltas[k] for k in keys], retain_graph=not last, allow_unused=True)
            grads[layer] = {k: torch.zeros_like(acts[k]) if g is None else g for k, g in zip(keys, gs)}
    return value.detach(), acts, stored, grads


@torch.no_grad()
def _patterns_with(model, tokens, layers, q_src: dict, k_src: dict) -> dict[int, Tensor]:
    """Attention patterns of a run whose queries and keys are overwritten at every layer
    (``q_src[l]``, ``k_src[l]``); the rest of the run does not matter for the pattern."""
    hooks = [(hook_name("q", l, model), lambda x, hook, l=l: q_src[l]) for l in layers]
    hooks += [(hook_name("k", l, model), lambda x, hook, l=l: k_src[l]) for l in layers]
    with hooked(model, hooks):
        _, pats = runs.cache_at(model, tokens, [("pattern", l) for l in layers])
    return {l: pats[("pattern", l)] for l in layers}


# ---- the method -------------------------------------------------------------------------
def atp_star_all(
    model,
    ds: ContrastiveDataset,
    *,
    sites: Sequence[str] | str = ("attn_out", "mlp_out", "z"),
    direction: str = "noising",  # as AtP: "noising" (clean-run gradient) | "denoising"
    metric: Metric | None = "logit_diff",
    qk_fix: bool = True,  # recompute the softmax for q and k nodes (no effect on other sites)
    grad_drop: bool = True,  # combine the L-1 layer-dropped estimates
    drop_layers: Sequence[int] | None = None,  # layers GradDrop drops (None: all); () = none
    rule: str = "exact",  # QK fix softmax: "exact", or "linear" (its linearisation: equals AtP)
    head_totals: bool = False,  # site z: one node per head (all positions), axes (layer, head)
    per_prompt: bool = False,  # also each prompt's AtP* score (GradDrop combined per prompt)
    positions: str = "auto",  # position axis, as AtP's ("auto" | "tokens" | "named" | "end")
) -> dict[str, AttributionResult]:
    """AtP* scores (QK fix + GradDrop) of every site in ``sites``, on AtP's scale.

    Sites: ``attn_out``, ``mlp_out`` (axes ``(layer, pos)``), ``z`` (``(layer, head, pos)``,
    or ``(layer, head)`` with ``head_totals=True``: GradDrop then combines whole-head
    estimates), ``q`` (``(layer, head, pos)``) and ``k`` (``(layer, head, pos)``, head = KV
    head). ``qk_fix=False, grad_drop=False`` is plain AtP; ``drop_layers=()`` drops nothing
    (GradDrop then returns AtP). ``meta`` holds the per-layer-drop count of backward passes.
    ``per_prompt=True`` (default metric only) also keeps each prompt's AtP* score: its own
    estimates normalised by its own logit-difference gap, GradDrop-combined per prompt.
    Mixed-length datasets and ``positions`` as in ``attribution_patching_all``.

    >>> from mechsteer.tiny import tiny_model
    >>> from mechsteer.tasks import ioi
    >>> model = tiny_model("llama"); ds = ioi(model, n=4)
    >>> out = atp_star_all(model, ds, sites=("z", "k"), head_totals=True)
    >>> out["z"].method, out["z"].axes, tuple(out["k"].scores.shape)
    ('atp*', ('layer', 'head'), (2, 2, 15))
    """
    hints = {s: _RESID_HINT for s in ("resid_pre", "resid_mid", "resid_post")}
    check_sites(sites, STAR_SITES, name="sites", hints=hints)  # the resid hint, before core's own check
    run = core.setup(model, ds, sites, STAR_SITES, direction, metric, per_prompt, positions)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}.")
    L = model.cfg.n_layers
    layers = range(L)
    if drop_layers is None:
        drop_layers = list(range(1, L)) if grad_drop else []  # dropping layer 0 moves no other node
    drop_layers = [int(l) for l in drop_layers]
    if any(not 0 <= l < L for l in drop_layers):
        raise ValueError(f"drop_layers must be layers 0..{L - 1}, got {drop_layers}.")
    if grad_drop and L < 2:
        raise ValueError("GradDrop needs at least two layers (it averages over L-1 of them); pass grad_drop=False.")
    qk = [s for s in run.sites if s in ("q", "k")]
    grad_keys = [(s, l) for s in run.sites if s not in qk for l in layers]
    grad_keys += [("pattern", l) for l in layers] if qk and qk_fix else [(s, l) for s in qk for l in layers]
    diff_keys = [(s, l) for s in run.sites for l in layers]
    store = [(s, l) for s in ("q", "k") for l in layers] if qk and qk_fix else []

    with runs.timer() as t, runs.float32_logits(model):
        m_base, acts, base_qk, grads = _drop_pass(model, run.base, grad_keys, store, run.values, drop_layers)
        with torch.no_grad():
            logits, other = runs.cache_at(model, run.other, diff_keys)
        m_clean, m_corr = run.clean_corr(m_base, run.values(logits), "attribution_patching (atp*)")
        fixed = _fix_inputs(model, run, layers, qk, acts, base_qk, other) if qk and qk_fix else {}
        scores, pps = {}, {}
        for s in run.sites:
            per_drop, pp_drop = {}, {}
            totals = s == "z" and head_totals
            for layer, g in grads.items():
                raw = _raw(s, g, acts, other, fixed, layers, rule, model, qk_fix)  # (B, L, ..., pos)
                if totals:
                    raw = raw.sum(-1)  # pads add exactly 0: no gradient reaches them
                per_drop[layer], pp = run.normalise(raw.double(), m_clean, m_corr, per_prompt,
                                                    None if totals else run.axis)
                if pp is not None:
                    pp_drop[layer] = pp.transpose(0, 1)  # (L, B, ...): layer first for graddrop_combine
            combined = graddrop_combine(per_drop, L) if grad_drop else per_drop[None]
            scores[s] = check_finite(f"atp*: scores at site {s!r}", combined)
            if per_prompt:
                pps[s] = (graddrop_combine(pp_drop, L) if grad_drop else pp_drop[None]).transpose(0, 1)
    meta = {**run.meta(m_clean, m_corr), "qk_fix": qk_fix, "grad_drop": grad_drop, "drop_layers": drop_layers,
            "backward_passes": 1 + len(drop_layers), "rule": rule}
    return {
        s: AttributionResult(
            scores=sc, axes=("layer", "head") if s == "z" and head_totals else
            ("layer", "head", "pos") if s in ("z", "q", "k") else ("layer", "pos"),
            method="atp*", metric=run.metric_name,
            labels={} if s == "z" and head_totals else {"pos": run.axis.labels},
            seconds=t["seconds"], per_prompt=pps.get(s), meta={**meta, "site": s},
        )
        for s, sc in scores.items()
    }


def _fix_inputs(model, run, layers, qk, acts, base_qk, other) -> dict:
    """Patterns the QK fix needs: clean A and G come from the gradient pass; A' of patched
    queries (one forward) and the key score changes d (one forward, anchored at key 0)."""
    out = {"A": {l: acts[("pattern", l)].double() for l in layers}}
    q0 = {l: base_qk[("q", l)] for l in layers}
    k0 = {l: base_qk[("k", l)] for l in layers}
    if "q" in qk:
        q1 = {l: other[("q", l)] for l in layers}
        out["Aq"] = {l: a.double() for l, a in _patterns_with(model, run.base, layers, q1, k0).items()}
    if "k" in qk:
        k1 = {l: other[("k", l)].clone() for l in layers}
        for l in layers:
            if not torch.equal(k1[l][:, 0], k0[l][:, 0]):
                raise ValueError(
                    f"The QK fix for keys reads score changes against the key at position 0, which must be "
                    f"the same in both runs (a shared first token such as BOS); layer {l}'s differs. "
                    "Prepend a shared BOS token, or use qk_fix=False for site 'k'."
                )
        Ak = _patterns_with(model, run.base, layers, q0, k1)
        d = {}
        for l in layers:
            A, B_ = out["A"][l], Ak[l].double()
            d[l] = _log_diff(B_, A) - _log_diff(B_[..., :1], A[..., :1])  # (B, H, T, S) minus anchor column
        out["d"] = d
    return out


def _raw(site, g, acts, other, fixed, layers, rule, model, qk_fix) -> Tensor:
    """First-order metric change per prompt and cell for one backward pass's gradients."""
    if site in ("q", "k") and qk_fix:
        A, G = fixed["A"], {l: g[("pattern", l)].double() for l in layers}
        if site == "q":
            return runs.gather([query_fix(A[l], fixed["Aq"][l], G[l], rule) for l in layers], 1)
        n_kv = other[("k", 0)].shape[2]
        return runs.gather([key_fix(A[l], fixed["d"][l], G[l], n_kv, rule) for l in layers], 1)
    return runs.gather([core.dot(g[(site, l)], other[(site, l)], acts[(site, l)]) for l in layers], 1)


def graddrop_combine(per_drop: dict, n_layers: int) -> Tensor:
    """GradDrop's combination, c_GD(n) = 1/(L-1) sum_{l != layer(n)} |c_l(n)| with the sign of
    the undropped estimate c_None(n). ``per_drop[l]`` are scores ``(layer, ...)`` with layer l's
    gradient dropped (None: nothing dropped); a layer l not in ``per_drop`` changes nothing
    for any node, so c_l(n) = c_None(n) there, as it is for every l below the node's layer.

    >>> c = {None: torch.tensor([1.0, -2.0]), 1: torch.tensor([3.0, 0.0])}
    >>> graddrop_combine(c, 2)  # layer-0 node: |c_1| = 3; layer-1 node: |c_None| (dropping 0 changes nothing)
    tensor([ 3., -2.])
    """
    base = per_drop[None]
    total = torch.zeros_like(base)
    for l in range(n_layers):
        est = per_drop.get(l, base)
        for j in range(n_layers):  # node layer j: l < j unchanged, l == j excluded, l > j dropped
            if l < j:
                total[j] += base[j].abs()
            elif l > j:
                total[j] += est[j].abs()
    sign = torch.where(base < 0, -1.0, 1.0).to(base.dtype)
    return sign * total / max(n_layers - 1, 1)


def atp_star(model, ds: ContrastiveDataset, *, site: str = "z", **kwargs) -> AttributionResult:
    """AtP* scores of one site; see ``atp_star_all`` (same keyword arguments).

    >>> from mechsteer.tiny import tiny_model
    >>> from mechsteer.tasks import ioi
    >>> model = tiny_model("gpt2")
    >>> atp_star(model, ioi(model, n=4), site="q").axes
    ('layer', 'head', 'pos')
    """
    if not isinstance(site, str):
        raise TypeError(f"site must be one site name (str), got {site!r}; use atp_star_all for several.")
    return atp_star_all(model, ds, sites=(site,), **kwargs)[site]
