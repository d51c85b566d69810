"""Function vectors as fixed-parameter interventions (seed papers 004 and 000, Sec. 3.2).

Both re-inject a task's mean head activations at the LAST position of the prompt, with
strength beta (the ``scale`` of ``inject_fv`` / ``inject_dfv``; beta = 0 is the identity):

- ``FunctionVector``: h~ = h + beta * v at ``resid_post`` of one layer l*, where
  v = sum_{(l,h) in top-k} mean_z[l,h] @ W_O[l,h] (Todd et al.'s function vector).
- ``DistributedFV`` (paper 000's DFV): at each selected head's ``z``, ``mode="add"``:
  z~ = z + beta * mean_z[l,h]; ``mode="replace"``: z~ = z + beta * (mean_z[l,h] - z)
  (beta = 1 sets z to the mean). Other heads are untouched; no layer is chosen.

They are ``mechsteer.interventions.Intervention`` subclasses with ``learnable = False``:
the vector and means are buffers (no gradient, never trained), the hooks and the
generation-step rule are the base's. ``apply`` defaults to ``generation="auto"``: plain
runs of any lengths are steered at their last position; inside ``model.generate`` the
prompt's last position is steered, and with ``every_step=True`` each generated token's
position too (Todd et al.'s and paper 000's generation code add at index -1 of every
forward under Hugging Face's KV cache). Uncached generation (``use_past_kv_cache=False``)
steers the same positions, so it gives what cached generation gives.

>>> import torch
>>> from mechsteer.tiny import tiny_model
>>> model = tiny_model("gpt2")
>>> iv = FunctionVector(torch.randn(64), layer=1, n_layers=2)
>>> iv.n_params, iv.sites, iv.layers
(0, ('resid_post',), (1,))
>>> tokens = model.to_tokens("The capital of France is")
>>> with iv.apply(model, beta=0.0):
...     same = model(tokens)
>>> bool((same == model(tokens)).all())
True
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechsteer.interventions.base import Intervention

MODES = ("add", "replace")


def check_heads(heads: Sequence[tuple[int, int]], n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """``heads`` as (layer, head) int pairs, each in range, distinct, at least one."""
    heads = [(int(l), int(h)) for l, h in heads]
    if not heads:
        raise ValueError("heads is empty; give at least one (layer, head), e.g. from top_heads(scores, k).")
    bad = [lh for lh in heads if not (0 <= lh[0] < n_layers and 0 <= lh[1] < n_heads)]
    if bad:
        raise ValueError(f"Heads {bad} are out of range: this model has layers 0..{n_layers - 1}, heads 0..{n_heads - 1}.")
    if len(set(heads)) != len(heads):
        raise ValueError(f"heads has duplicates: {heads}.")
    return heads


class _Fixed(Intervention):
    """Fixed values re-injected at the last position; ``every_step``: in generation, each
    generated token's position too (cached steps; positions from the prompt's last on in
    uncached reruns)."""

    position_bound = False
    learnable = False

    def __init__(self, sites, layers, *, every_step: bool = False, **shapes):
        super().__init__(sites, layers, "last", **shapes)
        if not isinstance(every_step, bool):
            raise TypeError(f"every_step must be True or False, got {every_step!r}.")
        self.every_step = every_step

    def _steer_step(self, site: str, li: int, x: Tensor, b: Tensor, step: str, n: int) -> Tensor:
        if not self.every_step or step == "prompt":
            return super()._steer_step(site, li, x, b, step, n)
        if step == "cached":
            return self._steer(site, li, x, b)  # the one new token
        return torch.cat([x[:, : n - 1], self.edit(site, li, x[:, n - 1 :], b)], dim=1)  # rerun

    def apply(self, model, beta=1.0, *, check_fired: bool = True, generation: bool | str = "auto", where=None):
        """``Intervention.apply`` with ``generation="auto"`` by default (see the module docstring);
        ``where``: ``(batch, 1)`` each right-padded prompt's last token (``ds.last[:, None]``)."""
        return super().apply(model, beta, check_fired=check_fired, generation=generation, where=where)

    def extra_repr(self) -> str:
        return f"sites={self.sites}, layers={self.layers}, every_step={self.every_step}"


class FunctionVector(_Fixed):
    """h~ = h + beta * v at ``resid_post`` of ``layer``, last position (v: ``function_vector``).

    Adding there equals adding at that layer's ``mlp_out`` or the next layer's
    ``resid_pre`` (tested).
    """

    def __init__(self, vector: Float[Tensor, " d_model"], layer: int, *, n_layers: int, every_step: bool = False):
        if not isinstance(vector, Tensor) or vector.ndim != 1:
            raise ValueError(f"fv has shape {tuple(getattr(vector, 'shape', ()))}; expected (d_model,).")
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"layer must be an int, got {layer!r} ({type(layer).__name__}).")
        if not 0 <= layer < n_layers:
            raise ValueError(f"Layer {layer!r} is out of range: this model has layers 0..{n_layers - 1}.")
        super().__init__(("resid_post",), (int(layer),), every_step=every_step, n_layers=n_layers, d_model=vector.shape[0])
        self.register_buffer("vector", vector.detach().clone())

    def edit(self, site: str, li: int, h: Float[Tensor, "batch pos d_model"], beta: Float[Tensor, " batch"]) -> Tensor:
        return h + beta[:, None, None] * self.vector.to(h)


class DistributedFV(_Fixed):
    """Each selected head's ``z`` at the last position: z + beta * mean_z[l,h] (``"add"``) or
    z + beta * (mean_z[l,h] - z) (``"replace"``); other heads untouched."""

    def __init__(
        self, mean_z: Float[Tensor, "layer head d_head"], heads: Sequence[tuple[int, int]], *, d_model: int,
        mode: str = "add", every_step: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if not isinstance(mean_z, Tensor) or mean_z.ndim != 3:
            raise ValueError(f"mean_z has shape {tuple(getattr(mean_z, 'shape', ()))}; expected (layer, head, d_head).")
        n_layers, n_heads, d_head = mean_z.shape
        heads = check_heads(heads, n_layers, n_heads)
        layers = sorted({l for l, _ in heads})
        super().__init__(("z",), layers, every_step=every_step, n_layers=n_layers, d_model=d_model,
                         n_heads=n_heads, d_head=d_head)
        self.mode, self.heads = mode, heads
        mask = torch.zeros(len(layers), n_heads, dtype=torch.bool)
        for l, h in heads:
            mask[layers.index(l), h] = True
        self.register_buffer("mean_z", mean_z.detach()[layers].clone())  # (selected layers, head, d_head)
        self.register_buffer("head_mask", mask)  # (selected layers, head)

    def edit(
        self, site: str, li: int, h: Float[Tensor, "batch pos head d_head"], beta: Float[Tensor, " batch"]
    ) -> Tensor:
        m = self.mean_z[li].to(h)  # (H, d_head)
        b = beta[:, None, None, None]
        new = h + b * (m if self.mode == "add" else m - h)
        return torch.where(self.head_mask[li].to(h.device)[:, None], new, h)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, mode={self.mode!r}, every_step={self.every_step}"
