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

Both helpers are thin wrappers over the fixed-parameter interventions of
``mechsteer.fv.vectors`` (``FunctionVector``, ``DistributedFV``), applied with
``generation="auto"``: plain runs of any lengths are steered at their last position, and
in ``model.generate`` the prompt's last position (with ``every_step=True`` each generated
token's position too, as in Todd et al.'s and paper 000's Table 2 code). Cached and
uncached generation steer the same positions (the base's one generation-step rule).
A right-padded batch of prompts of different lengths passes ``last=ds.last`` (each
prompt's own last token); the FV pipeline itself never pads (``FVPrompts.batches`` groups
prompts of one length), so its position -1 is always each prompt's last token.

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
from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechsteer.attribution.result import AttributionResult
from mechsteer.fv.means import check_mean_z
from mechsteer.fv.vectors import MODES, DistributedFV, FunctionVector, check_heads

__all__ = ["MODES", "function_vector", "inject_dfv", "inject_fv", "top_heads"]


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
    check_mean_z(model, mean_z)
    heads = check_heads(heads, model.cfg.n_layers, model.cfg.n_heads)
    W_O = model.blocks[0].attn.W_O
    fv = torch.zeros(model.cfg.d_model, device=W_O.device, dtype=W_O.dtype)
    for l, h in heads:
        W = model.blocks[l].attn.W_O[h]  # (d_head, d_model)
        fv = fv + mean_z[l, h].to(W) @ W
    return fv


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}.")
    return float(scale)


def inject_fv(
    model,
    fv: Float[Tensor, " d_model"],
    layer: int,
    scale: float | int = 1.0,
    *,
    every_step: bool = False,
    last: Int[Tensor, " batch"] | None = None,
) -> contextlib.AbstractContextManager[dict[str, int]]:
    """Add scale * FV to the residual stream after block ``layer``, at the last position:
    ``FunctionVector(fv, layer).apply(model, beta=scale)``, yielding ``hooked``'s call counts.

    Hooks ``resid_post`` of ``layer``. Generation: see the module docstring. ``last``: each
    prompt's last token in a right-padded batch (``ds.last``); None: the last column.
    """
    scale = _check_scale(scale)
    if fv.shape != (model.cfg.d_model,):
        raise ValueError(f"fv has shape {tuple(fv.shape)}; expected (d_model,) = ({model.cfg.d_model},).")
    iv = FunctionVector(fv, layer, n_layers=model.cfg.n_layers, every_step=every_step)
    return iv.apply(model, scale, where=_where(last))


def inject_dfv(
    model,
    mean_z: Float[Tensor, "layer head d_head"],
    heads: Sequence[tuple[int, int]],
    scale: float | int = 1.0,
    mode: str = "add",
    *,
    every_step: bool = False,
    last: Int[Tensor, " batch"] | None = None,
) -> contextlib.AbstractContextManager[dict[str, int]]:
    """Distributed FV: re-inject mean_z[l,h] at each selected head's ``z``, last position:
    ``DistributedFV(mean_z, heads, mode=mode).apply(model, beta=scale)``.

    ``mode="add"``: z <- z + scale * mean_z[l,h]. ``mode="replace"``:
    z <- z + scale * (mean_z[l,h] - z) (scale 1: z = mean_z). Generation: module docstring.
    ``last``: each prompt's last token in a right-padded batch (``ds.last``).

    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("llama")
    >>> tokens = model.to_tokens("Hello there")
    >>> with inject_dfv(model, torch.randn(2, 4, 16), [(0, 1), (1, 3)], mode="replace") as calls:
    ...     _ = model(tokens)
    >>> calls["fwd:blocks.0.attn.hook_z"], calls["fwd:blocks.1.attn.hook_z"]
    (1, 1)
    """
    scale = _check_scale(scale)
    check_mean_z(model, mean_z)
    iv = DistributedFV(mean_z, heads, d_model=model.cfg.d_model, mode=mode, every_step=every_step)
    return iv.apply(model, scale, where=_where(last))


def _where(last) -> Tensor | None:
    """``last`` (batch,) as the ``(batch, 1)`` token index an intervention binds."""
    if last is None:
        return None
    if not isinstance(last, Tensor) or last.ndim != 1:
        raise ValueError(f"last must be a (batch,) tensor of each prompt's last token index (ds.last), got {last!r}.")
    return last.long()[:, None]
