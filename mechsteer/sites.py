"""Model sites: the names users write, mapped to TransformerLens hook names and shapes.

A *site* is an activation family (``attn_out``, ``z``, ...); a *location* is one cell
of it: (site, layer, pos, head). ``SITES`` holds the facts as data; ``hooked`` is the one
way mechsteer runs a model with hooks: scoped (hooks are removed on exit, also when an
exception is raised) and checked (every requested hook must fire, else
``HookNotFiredError``).

Hook callbacks receive ``(activation, hook)``. The bridge passes *canonical* hook names
in ``hook.name`` (``blocks.3.hook_out`` for ``blocks.3.hook_resid_post``), so never key
logic on ``hook.name``: close over the name you registered instead.
"""

from __future__ import annotations

import contextlib
import difflib
import numbers
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch


# What each method may do at a site (``Site.uses``); ``sites_for(use)`` lists them.
USES = {
    "patch": "activation patching and attribution patching (AtP) replace or perturb it",
    "dla": "direct logit attribution projects it onto the unembedding",
    "readout": "AttnLRP reads relevance out at it",
    "intervene": "an Intervention (ActivScalar, SteerVec, DynScalar, FV/DFV) edits it",
    "scalar": "an ActivScalar can take one scalar per cell of an attribution grid there",
}
_RESID_MID_NOTE = (
    "On the TransformerLens 4 bridge hook_resid_mid is ln2.hook_in, where a returned tensor does not patch "
    "the residual stream (only an in-place write does); use resid_post of the layer before, or attn_out."
)


@dataclass(frozen=True)
class Site:
    """One activation family: its hook-name template, the axes after ``batch``, and the
    facts methods ask for (which ``uses`` it supports; a ``note`` shown in errors)."""

    name: str
    hook: str  # with {layer} where the site exists once per block
    axes: tuple[str, ...]
    doc: str
    uses: frozenset[str] = frozenset()
    note: str = ""

    @property
    def per_head(self) -> bool:
        """Whether the site has a head axis (query heads or KV heads)."""
        return "head" in self.axes or "kv_head" in self.axes

    @property
    def per_layer(self) -> bool:
        """Whether the site exists once per block (else once per model, e.g. ``embed``)."""
        return "{layer}" in self.hook


def _site(name, hook, axes, doc, uses="", note=""):
    return Site(name, hook, axes, doc, frozenset(uses.split()), note)


SITES: dict[str, Site] = {
    s.name: s
    for s in [
        _site("resid_pre", "blocks.{layer}.hook_resid_pre", ("pos", "d_model"), "residual stream entering the block",
              "patch readout"),
        _site("resid_mid", "blocks.{layer}.hook_resid_mid", ("pos", "d_model"),
              "residual stream between attention and MLP", "patch readout", _RESID_MID_NOTE),
        _site("resid_post", "blocks.{layer}.hook_resid_post", ("pos", "d_model"), "residual stream leaving the block",
              "patch readout intervene scalar"),
        _site("attn_out", "blocks.{layer}.hook_attn_out", ("pos", "d_model"), "attention output added to the residual",
              "patch dla readout intervene scalar"),
        _site("mlp_out", "blocks.{layer}.hook_mlp_out", ("pos", "d_model"), "MLP output added to the residual",
              "patch dla readout intervene scalar"),
        _site("z", "blocks.{layer}.attn.hook_z", ("pos", "head", "d_head"),
              "per-head attention-weighted values, before W_O", "patch dla intervene"),
        _site("result", "blocks.{layer}.attn.hook_result", ("pos", "head", "d_model"),
              "per-head output after W_O (needs use_attn_result)"),
        _site("pattern", "blocks.{layer}.attn.hook_pattern", ("head", "query_pos", "key_pos"), "attention weights A"),
        _site("q", "blocks.{layer}.attn.hook_q", ("pos", "head", "d_head"), "queries"),
        _site("k", "blocks.{layer}.attn.hook_k", ("pos", "kv_head", "d_head"), "keys (per KV head on GQA models)"),
        _site("v", "blocks.{layer}.attn.hook_v", ("pos", "kv_head", "d_head"), "values (per KV head on GQA models)",
              "intervene"),
        _site("mlp_pre", "blocks.{layer}.mlp.hook_pre", ("pos", "d_mlp"), "MLP pre-activation (the gate on gated MLPs)"),
        _site("mlp_pre_linear", "blocks.{layer}.mlp.hook_pre_linear", ("pos", "d_mlp"),
              "the linear (up) branch of a gated MLP"),
        _site("mlp_post", "blocks.{layer}.mlp.hook_post", ("pos", "d_mlp"), "MLP hidden activation, before W_out"),
        _site("ln1_scale", "blocks.{layer}.ln1.hook_scale", ("pos", "one"), "scale of the norm before attention"),
        _site("ln2_scale", "blocks.{layer}.ln2.hook_scale", ("pos", "one"), "scale of the norm before the MLP"),
        _site("ln1_post_scale", "blocks.{layer}.ln1_post.hook_scale", ("pos", "one"),
              "scale of the norm after attention (Gemma-2/3 only)"),
        _site("ln2_post_scale", "blocks.{layer}.ln2_post.hook_scale", ("pos", "one"),
              "scale of the norm after the MLP (Gemma-2/3 only)"),
        _site("embed", "hook_embed", ("pos", "d_model"), "token embeddings"),
        _site("pos_embed", "hook_pos_embed", ("pos", "d_model"), "learned positional embeddings (GPT-2 style only)"),
        _site("final_scale", "ln_final.hook_scale", ("pos", "one"), "scale of the final norm before the unembedding"),
        _site("logits", "unembed.hook_out", ("pos", "d_vocab"), "the logits"),
    ]
}
# TransformerLens 4.3 warns when a forward hook edits a norm's hook_scale (and falls back to
# its exact path); AttnLRP does so on purpose and filters this message.
NORM_SCALE_EDIT_WARNING = "A forward hook edited hook_scale"


def sites_for(use: str) -> tuple[str, ...]:
    """The sites that support ``use`` (a key of ``USES``), in ``SITES`` order.

    >>> sites_for("dla")
    ('attn_out', 'mlp_out', 'z')
    """
    if use not in USES:
        raise ValueError(f"Unknown use {use!r}; known uses: {', '.join(USES)}.")
    return tuple(n for n, s in SITES.items() if use in s.uses)


def check_sites(
    sites: Sequence[str] | str, use: str | Sequence[str], *, name: str = "site", hints: Mapping[str, str] | None = None
) -> list[str]:
    """Validate site names for a method: a non-empty str or list of distinct known sites,
    each supporting ``use`` (a key of ``USES``, or an explicit list of allowed sites).
    ``name`` is the argument named in errors; ``hints`` (else the site's note) extra advice."""
    allowed = sites_for(use) if isinstance(use, str) else tuple(use)
    if isinstance(sites, str):
        sites = [sites]
    elif isinstance(sites, Sequence):
        sites = list(sites)
    else:
        raise TypeError(f"{name} must be a site name or a list of them, got {type(sites).__name__}: {sites!r}.")
    if not sites:
        raise ValueError(f"{name} is empty ({sites!r}); pass at least one site of {list(allowed)}.")
    for s in sites:
        if not isinstance(s, str):
            raise TypeError(f"{name} must hold site names (str), got {s!r} ({type(s).__name__}) in {sites!r}.")
        site = get_site(s)  # unknown name -> ValueError with a suggestion
        if s not in allowed:
            hint = (hints or {}).get(s) or (f" {site.note}" if site.note else "")
            raise ValueError(
                f"This method does not support site {s!r} ({name}={sites!r}); it supports sites {list(allowed)}.{hint}"
            )
    if len(set(sites)) != len(sites):
        raise ValueError(f"{name} names a site twice: {sites!r}; pass each site once.")
    return sites


class HookNotFiredError(RuntimeError):
    """A hook registered for a run never fired: the method would silently do nothing."""


def get_site(site: str) -> Site:
    """The ``Site`` called ``site``; ValueError naming the known sites otherwise."""
    if site not in SITES:
        close = difflib.get_close_matches(site, SITES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown site {site!r}; known sites: {', '.join(SITES)}.{hint}")
    return SITES[site]


def _check_layer(model, layer: int) -> None:
    n = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"Layer {layer!r} is out of range: this model has layers 0..{n - 1}.")


def hook_name(site: str, layer: int | None = None, model=None) -> str:
    """The TransformerLens hook name of ``site`` at ``layer`` (checked against ``model``);
    ``layer`` is None for sites that exist once per model (``embed``, ``logits``, ...).

    >>> hook_name("attn_out", 3), hook_name("final_scale")
    ('blocks.3.hook_attn_out', 'ln_final.hook_scale')
    """
    s = get_site(site)
    if s.per_layer != (layer is not None):
        need = "a layer" if s.per_layer else "no layer (it exists once per model)"
        raise ValueError(f"Site {site!r} takes {need}; got layer={layer!r}.")
    if model is not None and s.per_layer:
        _check_layer(model, layer)
        if site == "result" and not model.cfg.use_attn_result:
            raise ValueError(
                "Site 'result' needs per-head outputs: call model.set_use_attn_result(True) first "
                "(or use site 'z', which needs no flag)."
            )
    return s.hook.format(layer=layer)


def has_site(model, site: str, layer: int | None = None) -> bool:
    """Whether ``model`` exposes ``site`` (e.g. Gemma's post-norm scales, GPT-2's pos_embed);
    for per-layer sites, at ``layer`` (default 0)."""
    s = get_site(site)
    if site == "pos_embed" and getattr(model.cfg, "positional_embedding_type", "standard") != "standard":
        return False  # rotary models list hook_pos_embed, but it never fires
    return hook_name(site, (0 if layer is None else layer) if s.per_layer else None) in model.hook_dict


def axis_sizes(model, n_pos: int) -> dict[str, int]:
    """Size of every named axis for ``model`` and prompts of ``n_pos`` tokens."""
    cfg = model.cfg
    return {
        "pos": n_pos,
        "query_pos": n_pos,
        "key_pos": n_pos,
        "head": cfg.n_heads,
        "kv_head": getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
        "d_model": cfg.d_model,
        "d_head": cfg.d_head,
        "d_mlp": getattr(cfg, "d_mlp", None) or 4 * cfg.d_model,
        "d_vocab": cfg.d_vocab,
        "one": 1,
        "layer": cfg.n_layers,
    }


def site_shape(model, site: str, n_pos: int) -> tuple[int, ...]:
    """Shape of one layer's activation at ``site`` (without the batch axis)."""
    sizes = axis_sizes(model, n_pos)
    return tuple(sizes[a] for a in get_site(site).axes)


def site_table(model, n_pos: int = 8) -> list[dict[str, str]]:
    """One row per site ``model`` exposes: name, hook template, shape per layer for
    prompts of ``n_pos`` tokens, axes, what mechsteer's methods may do there, meaning."""
    return [
        {
            "site": s.name,
            "hook": s.hook,
            f"shape (pos={n_pos})": str(site_shape(model, s.name, n_pos)),
            "axes": ", ".join(s.axes),
            "used by": ", ".join(sorted(s.uses)) or "-",
            "meaning": s.doc,
        }
        for s in SITES.values()
        if has_site(model, s.name)
    ]


@dataclass(frozen=True)
class Location:
    """One cell of a site: (site, layer, pos, head). ``None`` means all positions / heads."""

    site: str
    layer: int
    pos: int | None = None
    head: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.site, str):
            raise TypeError(f"Location site must be a site name (str), got {self.site!r}; known sites: {', '.join(SITES)}.")
        for key in ("layer", "pos", "head"):
            value = getattr(self, key)
            if value is None and key != "layer":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                none = "" if key == "layer" else " or None"
                raise TypeError(f"Location {key} must be an int{none}, got {value!r} ({type(value).__name__}).")
            object.__setattr__(self, key, int(value))

    def validate(self, model, n_pos: int | None = None) -> "Location":
        """Return self if it exists on ``model`` (prompts of ``n_pos`` tokens); else ValueError."""
        s = get_site(self.site)
        _check_layer(model, self.layer)
        if self.head is not None:
            if not s.per_head:
                raise ValueError(f"Site {self.site!r} has no head axis; drop head={self.head}.")
            axis = "kv_head" if "kv_head" in s.axes else "head"
            n = axis_sizes(model, 1)[axis]
            if not 0 <= self.head < n:
                raise ValueError(f"Head {self.head} is out of range for site {self.site!r}: {axis} is 0..{n - 1}.")
        if self.pos is not None and n_pos is not None and not -n_pos <= self.pos < n_pos:
            raise ValueError(f"Position {self.pos} is beyond the prompt: it has {n_pos} tokens (0..{n_pos - 1}).")
        return self

    def hook_name(self, model=None) -> str:
        """The hook name of this location's site and layer."""
        return hook_name(self.site, self.layer, model)


HookFn = Callable[[torch.Tensor, object], torch.Tensor | None]


def _resolve(model, name: str) -> None:
    if name not in model.hook_dict:
        close = difflib.get_close_matches(name, list(model.hook_dict), n=3)
        raise ValueError(f"Unknown hook {name!r} on this model. Close matches: {close}.")
    reason = model._gated_hook_reason(name) if hasattr(model, "_gated_hook_reason") else None
    if reason is not None:
        raise ValueError(f"Hook {name!r} is switched off on this model: call model.set_{reason}(True) first.")


@contextlib.contextmanager
def hooked(
    model,
    fwd_hooks: Sequence[tuple[str, HookFn]] = (),
    bwd_hooks: Sequence[tuple[str, HookFn]] = (),
    *,
    check_fired: bool = True,
) -> Iterator[dict[str, int]]:
    """Scope hooks to a ``with`` block and check that each one fired.

    Yields a dict ``{hook name: number of calls}`` (for forward hooks: "fwd:name",
    backward: "bwd:name"). On leaving the block normally, any hook that never fired
    raises ``HookNotFiredError``; hooks are removed on every exit path. A hook that
    returns a tensor of another shape than its input raises ValueError naming the hook.

    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("gpt2")
    >>> with hooked(model, [("blocks.0.hook_attn_out", lambda x, hook: x * 0)]) as calls:
    ...     _ = model(model.to_tokens("Hello"))
    >>> calls
    {'fwd:blocks.0.hook_attn_out': 1}
    """
    calls: dict[str, int] = {}

    def wrap(kind: str, name: str, fn: HookFn) -> HookFn:
        key = f"{kind}:{name}"
        calls[key] = 0

        def wrapped(act, hook):
            calls[key] += 1
            out = fn(act, hook)
            if isinstance(out, torch.Tensor) and isinstance(act, torch.Tensor) and out.shape != act.shape:
                raise ValueError(
                    f"The {kind} hook at {name!r} returned shape {tuple(out.shape)}, but its input has shape "
                    f"{tuple(act.shape)}; a hook must return a tensor of its input's shape (or None)."
                )
            if kind == "fwd" and out is not None and not isinstance(out, torch.Tensor):
                raise TypeError(f"The fwd hook at {name!r} returned {type(out).__name__}; return a tensor or None.")
            return out

        return wrapped

    for name, _ in (*fwd_hooks, *bwd_hooks):
        _resolve(model, name)
    fwd = [(n, wrap("fwd", n, f)) for n, f in fwd_hooks]
    bwd = [(n, wrap("bwd", n, f)) for n, f in bwd_hooks]
    with model.hooks(fwd_hooks=fwd, bwd_hooks=bwd, reset_hooks_end=True):
        yield calls
    if check_fired:
        silent = [k for k, v in calls.items() if v == 0]
        if silent:
            raise HookNotFiredError(
                f"{len(silent)} hook(s) never fired: {silent}. The run did not pass through "
                "them (wrong name, a start/stop layer that skips them, or no forward/backward pass)."
            )


def run_with_hooks(model, tokens, fwd_hooks=(), bwd_hooks=(), **kwargs):
    """``model(tokens, **kwargs)`` inside ``hooked``: one scoped, checked forward pass."""
    with hooked(model, fwd_hooks, bwd_hooks):
        return model(tokens, **kwargs)


def live_hooks(model) -> list[str]:
    """Names of hook points that still hold hooks (empty after every mechsteer run)."""
    return [n for n, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]
