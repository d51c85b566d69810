"""Building function vectors and injecting them (seed papers 004 and 000, Sec. 3.2).

Todd et al. (004) average each attention head's output at the last position over task
prompts, rank heads by their average indirect effect (paper 000 also by AttnLRP
relevance) and sum the top-k heads' mean outputs into one **function vector**

    FV = sum_{(l,h) in top-k} mean_z[l,h] @ W_O[l,h]          (d_model,)

which they add to the residual stream of ONE layer l* at the last position (l* is a
hyperparameter chosen on a validation split). Paper 000 proposes the **distributed FV**
(DFV): re-inject each selected head's mean at its own head, where it was extracted, so
no layer is chosen.

``mean_z`` is each head's mean ``hook_z`` (attention-weighted values, before W_O) at the
last position, (layer, head, d_head). Both injections are context managers that steer
any run inside the block, ``model.generate`` included, and yield ``hooked``'s call
counts; hooks are removed on every exit path and must fire.

- ``inject_fv``: adds scale * FV at ``blocks.{layer}.hook_resid_post``, the hidden state
  after block ``layer`` (Todd et al. and paper 000 hook the decoder layer's output).
  Adding there equals adding at that layer's ``hook_mlp_out``, or at
  ``blocks.{layer+1}.hook_resid_pre`` (tested).
- ``inject_dfv``: at each selected head's ``blocks.{l}.attn.hook_z``, ``mode="add"``
  sets z <- z + scale * mean_z[l,h] (paper 000's code), ``mode="replace"`` sets
  z <- z + scale * (mean_z[l,h] - z): scale 1 replaces z by the mean, 0 leaves it alone.

Generation. The bridge's ``generate`` keeps a KV cache by default: its first forward sees
the whole prompt, each later one only the newest token (seq length 1). The hooks steer
the prompt's last position; with ``every_step=True`` they also steer each generated
token's position. Todd et al.'s and paper 000's generation code (Table 2) add at index
-1 of every forward pass under Hugging Face's KV cache, i.e. ``every_step=True``. A
forward is told apart from a cached step by the same layer's attention pattern
(keys - queries = cached positions), so one-token prompts are steered too. Without a
KV cache (``use_past_kv_cache=False``) every step re-runs the whole sequence as a fresh
prompt and its last position (the newest token) is steered, as in every_step mode.
``generate(return_cache=True)`` runs one extra forward, which is steered like a prompt.

>>> import torch
>>> from mechsteer.tiny import tiny_model
>>> model = tiny_model("gpt2")
>>> mean_z = torch.randn(2, 4, 16)
>>> fv = function_vector(model, mean_z, [(0, 1), (1, 2)])
>>> tokens = model.to_tokens("The capital of France is")
>>> with inject_fv(model, fv, layer=0) as calls:
...     steered = model(tokens)
>>> calls["fwd:blocks.0.hook_resid_post"], bool((steered[0, -1] != model(tokens)[0, -1]).any())
(1, True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechsteer.attribution.result import AttributionResult
from mechsteer.sites import hook_name, hooked

MODES = ("add", "replace")


def top_heads(scores: AttributionResult, k: int = 20, by: str = "pos") -> list[tuple[int, int]]:
    """The k heads (layer, head) with the largest scores, best first.

    ``by="pos"`` ranks by the signed score (Todd et al.'s top AIE), ``"abs"`` by |score|.
    Ties keep (layer, head) order: the lower layer, then the lower head, comes first.

    >>> import torch
    >>> r = AttributionResult(torch.tensor([[0.1, 0.5], [0.5, -0.9]]), ("layer", "head"), "demo")
    >>> top_heads(r, k=3), top_heads(r, k=1, by="abs")
    ([(0, 1), (1, 0), (0, 0)], [(1, 1)])
    """
    if sorted(scores.axes) != ["head", "layer"]:
        raise ValueError(
            f"top_heads needs scores over axes ('layer', 'head'); got {scores.axes}. "
            "Use result.select(...) or result.sum('pos') first."
        )
    s = scores.scores if scores.axes == ("layer", "head") else scores.scores.T  # (L, H)
    if torch.isnan(s).any():
        raise ValueError("scores hold NaN; rank heads on finite scores only.")
    if by not in ("pos", "abs"):
        raise ValueError(f"by must be 'pos' or 'abs', got {by!r}.")
    n_layers, n_heads = s.shape
    if not 1 <= k <= s.numel():
        raise ValueError(f"k={k} is out of range: there are {s.numel()} heads ({n_layers} x {n_heads}).")
    key = s.abs() if by == "abs" else s
    order = torch.sort(key.reshape(-1), descending=True, stable=True).indices[:k]
    return [(int(i) // n_heads, int(i) % n_heads) for i in order]


def _check_heads(model, heads: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    heads = [(int(l), int(h)) for l, h in heads]
    if not heads:
        raise ValueError("heads is empty; give at least one (layer, head), e.g. from top_heads(scores, k).")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    bad = [lh for lh in heads if not (0 <= lh[0] < L and 0 <= lh[1] < H)]
    if bad:
        raise ValueError(f"Heads {bad} are out of range: this model has layers 0..{L - 1}, heads 0..{H - 1}.")
    if len(set(heads)) != len(heads):
        raise ValueError(f"heads has duplicates: {heads}.")
    return heads


def _check_mean_z(model, mean_z: Tensor) -> None:
    want = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    if tuple(mean_z.shape) != want:
        raise ValueError(f"mean_z has shape {tuple(mean_z.shape)}; expected (layer, head, d_head) = {want}.")


def function_vector(
    model, mean_z: Float[Tensor, "layer head d_head"], heads: Sequence[tuple[int, int]]
) -> Float[Tensor, " d_model"]:
    """FV = sum over ``heads`` of mean_z[l,h] @ W_O[l,h] (Todd et al.'s Eq. for v_t).

    Each head's output contribution without the bias b_O (as in Todd et al., which sum
    head outputs). On the model's device and dtype.

    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("llama")
    >>> function_vector(model, torch.zeros(2, 4, 16), [(0, 0)]).shape
    torch.Size([64])
    """
    _check_mean_z(model, mean_z)
    heads = _check_heads(model, heads)
    W_O = model.blocks[0].attn.W_O
    fv = torch.zeros(model.cfg.d_model, device=W_O.device, dtype=W_O.dtype)
    for l, h in heads:
        W = model.blocks[l].attn.W_O[h]  # (d_head, d_model)
        fv = fv + mean_z[l, h].to(W) @ W
    return fv


class _Steps:
    """Which forward passes to steer: a prompt pass always, a cached decode step if asked.

    The same layer's attention pattern (batch, head, query, key) fires before the steered
    hook; key - query positions are the cached ones (0 for a prompt pass).
    """

    def __init__(self, every_step: bool):
        self.every_step = every_step
        self.cached: dict[int, int] = {}

    def observe(self, layer: int):
        def fn(pattern: Tensor, hook) -> None:
            self.cached[layer] = pattern.shape[-1] - pattern.shape[-2]

        return fn

    def steer(self, layer: int) -> bool:
        return self.every_step or self.cached.get(layer, 0) == 0

    def hooks(self, model, layers: Sequence[int]) -> list:
        return [(hook_name("pattern", l, model), self.observe(l)) for l in sorted(set(layers))]


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}.")
    return float(scale)


@contextlib.contextmanager
def inject_fv(
    model,
    fv: Float[Tensor, " d_model"],
    layer: int,
    scale: float | int = 1.0,
    *,
    every_step: bool = False,
) -> Iterator[dict[str, int]]:
    """Add scale * FV to the residual stream after block ``layer``, at the last position.

    Hooks ``blocks.{layer}.hook_resid_post``. Generation: see the module docstring.
    """
    scale = _check_scale(scale)
    if fv.shape != (model.cfg.d_model,):
        raise ValueError(f"fv has shape {tuple(fv.shape)}; expected (d_model,) = ({model.cfg.d_model},).")
    name = hook_name("resid_post", layer, model)
    steps = _Steps(every_step)
    delta = scale * fv.detach()

    def add(x: Tensor, hook) -> Tensor | None:  # (B, T, d_model)
        if not steps.steer(layer):
            return None
        x = x.clone()
        x[:, -1] += delta.to(x)
        return x

    with hooked(model, [*steps.hooks(model, [layer]), (name, add)]) as calls:
        yield calls


@contextlib.contextmanager
def inject_dfv(
    model,
    mean_z: Float[Tensor, "layer head d_head"],
    heads: Sequence[tuple[int, int]],
    scale: float | int = 1.0,
    mode: str = "add",
    *,
    every_step: bool = False,
) -> Iterator[dict[str, int]]:
    """Distributed FV: re-inject mean_z[l,h] at each selected head's ``hook_z``, last position.

    ``mode="add"``: z <- z + scale * mean_z[l,h]. ``mode="replace"``:
    z <- z + scale * (mean_z[l,h] - z) (scale 1: z = mean_z). Generation: module docstring.

    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("llama")
    >>> tokens = model.to_tokens("Hello there")
    >>> with inject_dfv(model, torch.randn(2, 4, 16), [(0, 1), (1, 3)], mode="replace") as calls:
    ...     _ = model(tokens)
    >>> calls["fwd:blocks.0.attn.hook_z"], calls["fwd:blocks.1.attn.hook_z"]
    (1, 1)
    """
    scale = _check_scale(scale)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    _check_mean_z(model, mean_z)
    heads = _check_heads(model, heads)
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    steps = _Steps(every_step)
    mean_z = mean_z.detach()

    def make(l: int, hs: list[int]):
        idx = torch.tensor(hs)
        m = mean_z[l, idx]  # (n_sel, d_head)

        def edit(z: Tensor, hook) -> Tensor | None:  # (B, T, n_heads, d_head)
            if not steps.steer(l):
                return None
            z = z.clone()
            i, target = idx.to(z.device), m.to(z)
            last = z[:, -1, i]  # (B, n_sel, d_head)
            z[:, -1, i] = last + scale * (target if mode == "add" else target - last)
            return z

        return edit

    hooks = [(hook_name("z", l, model), make(l, hs)) for l, hs in sorted(by_layer.items())]
    with hooked(model, [*steps.hooks(model, list(by_layer)), *hooks]) as calls:
        yield calls
