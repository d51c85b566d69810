"""AttnLRP on TransformerLens hook points: one forward + one backward pass, many readouts.

AttnLRP (Achtibat et al., 2024) explains a model output f (``metric="logit"``: the
answer's logit f_c; ``"logit_diff"``: the logit difference f_c - f_w) as relevances R that add up to roughly f. Written as *gradient x
input*, ``R(a) = a * d~f/da`` for any activation a, where d~ is the gradient after the
rules of ``rules.py`` have been placed on the bridge's hook points (``rule_hooks``):

- ``blocks.{l}.ln1/ln2.hook_scale``, ``ln_final.hook_scale``: frozen (identity rule on
  the normaliser; the bridge then computes ``x / scale`` with a constant scale);
- ``attn.hook_q, hook_k`` x1/4 and ``attn.hook_v`` x1/2 (``uniform="qk"``, the uniform rule
  on Q.K^T and A.V folded onto q, k, v), or x1/2 on q, k, ``hook_pattern`` and v
  (``uniform="pattern"``): the same relevances;
- ``mlp.hook_post``: the identity rule on act(pre) (``mlp.hook_pre``), and on gated MLPs
  also the uniform rule on act(gate) * up (``mlp.hook_pre_linear``);
- CP-LRP (``variant="cp"``): the attention pattern is a constant and V keeps its full
  gradient; norms and MLP as above. Without biases it is exactly conservative.
- lxt's CP-LRP (``variant="cp-lxt"``): as "cp", and on gated MLPs the gate act(x W_gate)
  is a constant too, so R(x W_in) = R(act(gate) * up) (all relevance through the up
  projection) where "cp" gives each factor half (R_gate = R_up = R/2, Eq. 7's uniform
  rule). Also exactly conservative without biases; the two split relevance differently
  over the MLP's input, so input and head relevances differ (benchmarks/bench_lrp.py).
  Non-gated MLPs (GPT-2): identical to "cp".

Readouts of one call, all from the same pass: ``"input"`` (token-embedding relevance,
``hook_embed``, summed over d_model: axes ``("pos",)``; for learned positional
embeddings their share is in ``sites`` at resid_pre, layer 0), ``"sites"`` (R summed
over d_model at resid_pre / attn_out / mlp_out / resid_post: ``("site", "layer",
"pos")``) and ``"heads"`` (relevance of the attention weights from ``query_pos`` to the
``key_pos`` keys, ``R(A_qk) = A_qk * d~f/dA_qk`` with A's half of A.V: ``("layer",
"head")``; the function-vector recipe takes ``positive=True`` and the task-defining
tokens as ``key_pos``). ``rules=False`` gives plain gradient x input at the same places.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Sequence

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from mechsteer import runs
from mechsteer._validate import check_finite, positive_int
from mechsteer.attribution._common import (
    Metric,
    check_dataset,
    check_linear_metric,
    on_axis,
    per_prompt_on_axis,
    position_axis,
)
from mechsteer.attribution.lrp import rules as R
from mechsteer.attribution.result import AttributionResult
from mechsteer.sites import NORM_SCALE_EDIT_WARNING, HookFn, check_sites, hook_name, hooked, sites_for
from mechsteer.tasks.base import ContrastiveDataset

NORM_SCALES = ("ln1_scale", "ln2_scale")  # sites whose scale the identity rule freezes
MLP = {"pre": "mlp_pre", "pre_linear": "mlp_pre_linear", "post": "mlp_post"}
# Gradient factors of the uniform rule (Q.K^T and A.V, half to each factor) per placement:
# the path into q and k crosses both products, so "qk" folds both halvings onto them.
UNIFORM = {"qk": {"q": 0.25, "k": 0.25, "v": 0.5}, "pattern": {"q": 0.5, "k": 0.5, "pattern": 0.5, "v": 0.5}}
VARIANTS = ("attnlrp", "cp", "cp-lxt")
METHOD_NAMES = {"attnlrp": "attnlrp", "cp": "cp-lrp", "cp-lxt": "cp-lrp-lxt"}  # result.method
READOUTS = ("input", "sites", "heads")
READOUT_SITES = sites_for("readout")
DEFAULT_SITES = ("resid_pre", "attn_out", "mlp_out", "resid_post")
METRICS = ("logit_diff", "logit")  # what AttnLRP explains: a logit or a difference of two


def _mlp_hooks(layer: int, gated: bool, ratio, frozen_gate: bool = False) -> list[tuple[str, HookFn]]:
    """Identity rule on act(pre) (+ uniform rule on act(gate) * up, or with ``frozen_gate``
    lxt's constant gate), applied at hook_post."""
    seen: dict[str, Tensor] = {}

    def keep(key: str) -> HookFn:
        def fn(x, hook):
            seen[key] = x  # the tensor that flows on into act / the product
            return x

        return fn

    def post(x, hook):
        if gated and frozen_gate:
            return R.frozen_gate_rule(seen.pop("pre"), seen.pop("pre_linear"), x, ratio)
        if gated:
            return R.gated_rule(seen.pop("pre"), seen.pop("pre_linear"), x, ratio)
        return R.identity_rule(seen.pop("pre"), x, ratio)

    keys = ("pre", "pre_linear") if gated else ("pre",)
    return [(hook_name(MLP[k], layer), keep(k)) for k in keys] + [(hook_name(MLP["post"], layer), post)]


def rule_hooks(model, *, variant: str = "attnlrp", uniform: str = "qk") -> list[tuple[str, HookFn]]:
    """The forward hooks that place the rules (``variant``: one of ``VARIANTS``) on ``model``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    if uniform not in UNIFORM:
        raise ValueError(f"uniform must be one of {tuple(UNIFORM)}, got {uniform!r}.")
    ratio = R.ACT_RATIOS.get(model.cfg.act_fn)
    if ratio is None:
        raise ValueError(f"No identity rule for activation {model.cfg.act_fn!r}; supported: {sorted(R.ACT_RATIOS)}.")
    freeze = lambda x, hook: R.freeze_grad(x)  # noqa: E731
    hooks: list[tuple[str, HookFn]] = []
    for layer in range(model.cfg.n_layers):
        hooks += [(hook_name(site, layer), freeze) for site in NORM_SCALES]
        if variant in ("cp", "cp-lxt"):
            hooks.append((hook_name("pattern", layer), lambda x, hook: R.constant(x)))
        else:
            for site, s in UNIFORM[uniform].items():
                hooks.append((hook_name(site, layer), lambda x, hook, s=s: R.scale_grad(x, s)))
        hooks += _mlp_hooks(layer, bool(model.cfg.gated_mlp), ratio, frozen_gate=variant == "cp-lxt")
    return hooks + [(hook_name("final_scale"), freeze)]


@contextlib.contextmanager
def lrp_rules(
    model, *, variant: str = "attnlrp", uniform: str = "qk", rules: bool = True, extra: Sequence = ()
) -> Iterator[dict[str, int]]:
    """Run ``model`` with the LRP rules (and ``extra`` forward hooks after them), grad on.

    Yields ``hooked``'s call counts. Inside, ``a * grad`` of any activation is its relevance.

    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("llama")
    >>> with lrp_rules(model) as calls:
    ...     _ = model(model.to_tokens("Hello"))
    >>> calls["fwd:blocks.1.attn.hook_v"]
    1
    """
    hooks = rule_hooks(model, variant=variant, uniform=uniform) if rules else []
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.filterwarnings("ignore", message=NORM_SCALE_EDIT_WARNING)  # the norm's exact path, expected
        with hooked(model, [*hooks, *extra]) as calls:
            yield calls


def _key_mask(key_pos, n: int, n_pos: int, lengths: Tensor | None = None, device="cpu") -> Tensor | None:
    """``(n, n_pos)`` 0/1 mask of the keys to read; a negative position counts from each
    prompt's own end (its ``lengths``: prompts are right-padded)."""
    if key_pos is None:
        return None
    per_prompt = len(key_pos) > 0 and not isinstance(key_pos[0], int)
    rows = list(key_pos) if per_prompt else [key_pos] * n
    if len(rows) != n:
        raise ValueError(f"key_pos has {len(rows)} lists of positions for {n} prompts; give one per prompt.")
    mask = torch.zeros(n, n_pos, device=device)
    for i, row in enumerate(rows):
        for p in row:
            if isinstance(p, bool) or not isinstance(p, int) or not -n_pos <= p < n_pos:
                raise ValueError(f"key_pos entry {p!r} is not a position of these {n_pos}-token prompts.")
            mask[i, p if p >= 0 or lengths is None else int(lengths[i]) + p] = 1.0
    return mask


def _tokens(tokens, model) -> Tensor:
    """Raw prompts as a ``(batch, pos)`` tensor of ids in the model's vocabulary."""
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.is_floating_point() or tokens.numel() == 0:
        what = f"shape {tuple(tokens.shape)}, {tokens.dtype}" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise TypeError(f"data must be a ContrastiveDataset or a non-empty (batch, pos) tensor of token ids, got {what}.")
    vocab = model.cfg.d_vocab
    bad = (tokens < 0) | (tokens >= vocab)
    if bool(bad.any()):
        raise ValueError(f"data holds token ids outside the vocabulary 0..{vocab - 1}: {tokens[bad][:5].tolist()}.")
    return tokens


def _ids(v, n: int, model, name: str) -> Tensor | None:
    if v is None:
        return None
    v = torch.as_tensor(v, device="cpu").long() if not isinstance(v, Tensor) else v.long().cpu()
    v = v.expand(n) if v.ndim == 0 else v
    if v.shape != (n,) or ((v < 0) | (v >= model.cfg.d_vocab)).any():
        raise ValueError(f"{name} must be {n} token ids in 0..{model.cfg.d_vocab - 1}, got {v.tolist()}.")
    return v


def _one_pass(model, tokens, answer, wrong, *, names, heads, query_pos, mask, positive, share, last=None, **rule_kw):
    """One forward + one backward: target (B,), R_input (B,T), R_sites (B,S,L,T), R_heads (B,L,H).

    ``last`` (B,): each prompt's last token (right-padded prompts), where f is read and
    what ``query_pos=-1`` means; None: the last column.

    Readout hooks run after the rule hooks; each registers a tensor hook that reduces
    ``a * grad`` (float32) as soon as the backward pass reaches a, so no gradient is kept.
    """
    B, n_pos = tokens.shape
    L = model.cfg.n_layers
    dev = tokens.device
    rows = torch.arange(B, device=dev)
    if last is not None and query_pos == -1:
        query_at = lambda x: x[rows.to(x.device), :, last.to(x.device)]  # noqa: E731  (B, H, K) at each last query
    else:
        query_at = lambda x: x[:, :, query_pos]  # noqa: E731
    out = {
        "sites": torch.zeros(B, len(names), L, n_pos, device=dev),
        "heads": torch.zeros(B, L, model.cfg.n_heads, device=dev),
    }
    leaves: list[Tensor] = []

    def embed(x, hook):
        leaves.insert(0, x.detach().requires_grad_(True))
        return leaves[0]

    def site(i: int, layer: int) -> HookFn:
        def fn(x, hook):
            a = x.detach()

            def read(g):  # returns None: the gradient itself is left alone
                out["sites"][:, i, layer] = (a.float() * g.float()).sum(-1)

            x.register_hook(read)

        return fn

    def head(layer: int) -> HookFn:
        def fn(x, hook):  # (B, H, Q, K), after the rule at this hook point
            a = query_at(x.detach()).float()

            def read(g):
                r = share * a * query_at(g).float()  # (B, H, K)
                r = r * mask.to(r.device)[:, None] if mask is not None else r
                out["heads"][:, layer] = (r.clamp(min=0) if positive else r).sum(-1)

            if x.is_leaf:  # CP-LRP's constant pattern: read its gradient as an input
                leaves.append(x)
            x.register_hook(read)

        return fn

    extra = [(hook_name("embed"), embed)]
    extra += [(hook_name(s, l), site(i, l)) for i, s in enumerate(names) for l in range(L)]
    extra += [(hook_name("pattern", l), head(l)) for l in range(L)] if heads else []
    with lrp_rules(model, extra=extra, **rule_kw), runs.float32_logits(model):
        logits = model(tokens)
        f = (logits[:, -1] if last is None else logits[rows.to(logits.device), last.to(logits.device)]).float()
        idx, answer = torch.arange(B, device=f.device), answer.to(f.device)  # f: (B, vocab), on the last device
        target = f[idx, answer] - (f[idx, wrong.to(f.device)] if wrong is not None else 0.0)
        grads = torch.autograd.grad(target.sum(), leaves)
    r_input = (leaves[0].detach().float() * grads[0].float()).sum(-1)
    return target.detach().cpu(), r_input.cpu(), out["sites"].cpu(), out["heads"].cpu()


def _metric(metric, target) -> str | None:
    """``metric=`` (or the deprecated ``target=``): None (the data's default) or one of ``METRICS``."""
    check_linear_metric(metric, "AttnLRP")
    if target is not None:
        warnings.warn("attnlrp(target=...) is now attnlrp(metric=...); target= goes in the next release.",
                      DeprecationWarning, stacklevel=3)
        if metric is not None and metric != target:
            raise ValueError(f"Pass metric= only (target= is its old name); got metric={metric!r}, target={target!r}.")
        metric = target
    if metric is not None and (not isinstance(metric, str) or metric not in METRICS):
        raise ValueError(
            f"metric must be one of {list(METRICS)} for AttnLRP (relevance explains one logit or a difference of "
            f"two), got {metric!r}. For other metrics use activation_patching or attribution_patching."
        )
    return metric


def attnlrp(
    model,
    data: ContrastiveDataset | Int[Tensor, "batch pos"],
    *,
    metric: Metric | None = None,
    answer: Int[Tensor, " batch"] | int | None = None,
    wrong: Int[Tensor, " batch"] | int | None = None,
    variant: str = "attnlrp",
    readout: str | Sequence[str] = READOUTS,
    sites: Sequence[str] = DEFAULT_SITES,
    query_pos: int = -1,
    key_pos: Sequence | None = None,
    positive: bool = False,
    rules: bool = True,
    uniform: str = "qk",
    per_prompt: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
    target: str | None = None,
    positions: str = "auto",
    max_memory: int | float | str | None = None,
) -> AttributionResult | dict[str, AttributionResult]:
    """AttnLRP relevances R(a) = a * d~f/da, all readouts from one forward + one backward.

    f is each prompt's last-position logit difference f_c - f_w (``metric="logit_diff"``,
    the default for a dataset) or the logit f_a of ``answer`` (``"logit"``, the default
    for raw tokens); other metrics (callables, probabilities) are refused: relevance
    explains one logit or a difference of two. ``target=`` is the old name of ``metric=``
    (deprecated). ``variant``: "attnlrp" (default), "cp" or "cp-lxt" (CP-LRP with lxt's
    constant gate on gated MLPs; module docstring). ``readout``: one of ``READOUTS`` (returns that result) or several
    (returns a dict). ``"heads"`` is sum over k in ``key_pos`` (default all) of
    R(A[query_pos, k]), its positive part first if ``positive``; ``key_pos`` is one list
    of positions or one list per prompt. ``uniform`` picks where the uniform rule sits
    (same numbers). Scores are means over prompts; ``meta["target"]`` holds each f, so
    ``per_prompt`` input relevances summed over positions can be compared with it.
    ``batch_size`` is the number of prompts (sequences) per forward + backward pass; None
    (default) fits them to ``max_memory`` (bytes or ``"2GB"``; default a share of the free
    memory, ``runs.memory_budget``), counting each prompt twice (``runs.row_bytes``: its
    forward activations and the gradients of the backward pass).

    A dataset of prompts of different lengths (right-padded) is explained at each prompt's
    own last token: f is read there, ``query_pos=-1`` and negative ``key_pos`` count from
    each prompt's end, and the ``"input"`` and ``"sites"`` relevances are put on the
    ``positions`` axis (``"auto"`` | ``"tokens"`` | ``"named"`` | ``"end"``,
    ``mechsteer.tasks.positions``), each entry averaged over the prompts that have it.
    Pads get exactly 0 relevance (no relevance flows backwards in time).

    >>> from mechsteer.tiny import tiny_model
    >>> from mechsteer.tasks import ioi
    >>> model = tiny_model("llama")
    >>> out = attnlrp(model, ioi(model, n=4, template=1), progress=False)
    >>> out["sites"].axes, out["heads"].axes, out["input"].axes
    (('site', 'layer', 'pos'), ('layer', 'head'), ('pos',))
    """
    metric = _metric(metric, target)
    names = check_sites(sites, READOUT_SITES, name="sites")
    wanted = [readout] if isinstance(readout, str) else list(readout)
    if not wanted or any(r not in READOUTS for r in wanted):
        raise ValueError(f"readout must be one or more of {READOUTS}, got {readout!r}.")
    if variant not in VARIANTS or uniform not in UNIFORM:
        raise ValueError(f"variant must be one of {VARIANTS} and uniform one of {tuple(UNIFORM)}; "
                         f"got variant={variant!r}, uniform={uniform!r}.")
    if isinstance(data, ContrastiveDataset):
        check_dataset(data, model=model)
        if answer is not None or wrong is not None:
            raise ValueError("A ContrastiveDataset brings its own answers; pass answer=/wrong= only with raw tokens.")
        metric = metric or "logit_diff"
        axis = position_axis(data, positions)
        tokens, answer, wrong, labels = data.tokens, data.correct, data.wrong, axis.labels
        last = data.last.cpu() if data.is_padded else None
    else:
        metric = metric or "logit"
        axis, last = None, None
        if positions not in ("auto", "tokens"):
            raise ValueError(f"positions={positions!r} needs a ContrastiveDataset (lengths, named positions); raw "
                             "tokens are one length: use positions='auto'.")
        tokens = _tokens(data, model)
        labels = [f"{i}:{t}" for i, t in enumerate(model.to_str_tokens(data[0]))]
        if answer is None or (metric == "logit_diff" and wrong is None):
            need = "answer= and wrong=" if metric == "logit_diff" else "answer="
            raise ValueError(f"metric={metric!r} on raw tokens needs {need} token ids (one per prompt, or one int).")
    n, n_pos = tokens.shape
    ids = {"answer": _ids(answer, n, model, "answer"), "wrong": _ids(wrong, n, model, "wrong")}
    ids["wrong"] = ids["wrong"] if metric == "logit_diff" else None
    if isinstance(query_pos, bool) or not isinstance(query_pos, int) or not -n_pos <= query_pos < n_pos:
        raise ValueError(f"query_pos {query_pos!r} is beyond the prompt: it has {n_pos} tokens.")
    batch_size = positive_int("batch_size", batch_size, allow_none=True)
    if batch_size is None:  # forward + backward: about twice a forward's live bytes per prompt
        budget = runs.memory_budget(torch.device(model.cfg.device), max_memory)
        batch_size = max(1, budget // (2 * runs.row_bytes(model, n_pos, 1)))
    mask = _key_mask(key_pos, n, n_pos, None if last is None else last + 1, model.cfg.device)
    share = 0.5 if rules and variant == "attnlrp" else 1.0  # A's half of A.V (uniform rule)
    parts = []
    starts = range(0, n, batch_size)
    with runs.timer() as t:
        for s in tqdm(starts, desc="attnlrp", disable=not progress or len(starts) == 1):
            sl = slice(s, s + batch_size)
            dev = lambda x: x[sl].to(model.cfg.device) if x is not None else None  # noqa: E731
            parts.append(_one_pass(
                model, tokens[sl].to(model.cfg.device), dev(ids["answer"]), dev(ids["wrong"]),
                names=names if "sites" in wanted else [], heads="heads" in wanted, query_pos=query_pos,
                mask=mask[sl].to(model.cfg.device) if mask is not None else None,
                positive=positive, share=share, variant=variant, uniform=uniform, rules=rules,
                last=None if last is None else last[sl].to(model.cfg.device),
            ))
    f, r_input, r_sites, r_heads = (torch.cat(p) for p in zip(*parts))
    check_finite(f"attnlrp: the explained {metric} f", f)
    method = METHOD_NAMES[variant] if rules else "grad_x_input"
    meta = {"target": f, "variant": variant, "rules": rules, "query_pos": query_pos, "positive": positive}
    common = dict(method=method, metric=metric, seconds=t["seconds"], meta=meta)
    made = {
        "input": (r_input, ("pos",), {"pos": labels}),
        "sites": (r_sites, ("site", "layer", "pos"), {"pos": labels, "site": names}),
        "heads": (r_heads, ("layer", "head"), {}),
    }
    for k in wanted:
        check_finite(f"attnlrp: {k!r} relevances", made[k][0])
    results = {}
    for k, (v, ax, lab) in made.items():
        if k not in wanted:
            continue
        on = axis is not None and "pos" in ax  # per prompt in token coordinates -> the position axis
        results[k] = AttributionResult(
            scores=on_axis(v, axis) if on else v.mean(0), axes=ax, labels=lab,
            per_prompt=(per_prompt_on_axis(v, axis) if on else v) if per_prompt else None, **common)
    return results[wanted[0]] if isinstance(readout, str) else results
