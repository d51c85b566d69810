"""Activation scalars: steer by scaling the signed magnitude of activation vectors.

ACTIVSCALAR (seed paper 003, Eq. 5) learns one scalar alpha_{l,i}^(s) per intervention
point and multiplies the activation vector there:

    h~_{l,i}^(s) = h_{l,i}^(s) (1 + beta alpha_{l,i}^(s)).

The direction of h is kept; only its signed magnitude changes (alpha beta < -1 reverses it).
With per-head ``z`` a location is (layer, pos, head): one scalar per head; with ``v`` one
per KV head (Fig. 7's v-scaling: alpha = -1 zeroes that KV head's values, which every
query head of its group reads). The parameters
are tied to token positions, so an ActivScalar only runs on prompts of the length it was
built for (``n_pos``).

DYNSCALAR (Eq. 10) makes the scalar a function of the activation itself, with one vector
g_l^(s) per (site, layer), shared across positions:

    alpha_{l,i}^(s) = g_l^(s)T (h_{l,i}^(s) / ||h_{l,i}^(s)||_2),

plugged into Eq. 5. It runs on prompts of any length (a probe that finds task-relevant
vectors, then scales them).

>>> from mechsteer.tiny import tiny_model
>>> model = tiny_model("gpt2")
>>> ActivScalar(sites=["attn_out"], n_layers=48, d_model=1600, n_pos=19).n_params
912
>>> DynScalar.for_model(model, sites=["z"]).params["z"].shape
torch.Size([2, 4, 16])
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mechsteer.interventions.base import Intervention


def _bcast(beta: Tensor, ndim: int) -> Tensor:
    """beta (batch,) viewed to broadcast against a (batch, ...) tensor of ``ndim`` dims."""
    return beta.view(-1, *([1] * (ndim - 1)))


class ActivScalar(Intervention):
    """Eq. 5: h~ = h (1 + beta alpha), one scalar alpha per (site, layer, pos[, head])."""

    position_bound = True

    def param_shape(self, site: str) -> tuple[int, ...]:
        # (layer, pos) or (layer, pos, head)
        return (len(self.layers), self.n_sel_pos) + self.site_tail(site)[:-1]  # z: heads, v: KV heads

    def alpha(self, site: str) -> Float[Tensor, "layer pos *head"]:
        """The scalars alpha of ``site``: (layer, pos) or (layer, pos, head)."""
        return self.params[site]

    def edit(
        self, site: str, li: int, h: Float[Tensor, "batch pos *tail"], beta: Float[Tensor, " batch"]
    ) -> Float[Tensor, "batch pos *tail"]:
        """Eq. 5 on the selected positions of ``site`` at layer index ``li``."""
        a = self.params[site][li].to(dtype=h.dtype, device=h.device)  # (P,) or (P, H)
        a = a.unsqueeze(-1)  # broadcast over d_model / d_head
        return h * (1 + _bcast(beta, h.ndim) * a)


class DynScalar(Intervention):
    """Eq. 10 + Eq. 5: alpha = g^T (h / ||h||), one vector g per (site, layer[, head])."""

    position_bound = False

    def param_shape(self, site: str) -> tuple[int, ...]:
        # (layer, d_model) or (layer, head, d_head)
        return (len(self.layers),) + self.site_tail(site)

    def alpha(self, site: str, li: int, h: Float[Tensor, "*lead d"]) -> Float[Tensor, "*lead"]:
        """alpha_{l,i} = g_l^T h_{l,i} / ||h_{l,i}||_2 for activations ``h`` of ``site`` at layer
        index ``li`` (into ``self.layers``); ``h`` ends with d_model, or with (head, d_head) for z."""
        g = self.params[site][li].to(dtype=h.dtype, device=h.device)  # (d,) or (H, d_head)
        norm = h.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
        return ((h / norm) * g).sum(-1)

    def edit(
        self, site: str, li: int, h: Float[Tensor, "batch pos *tail"], beta: Float[Tensor, " batch"]
    ) -> Float[Tensor, "batch pos *tail"]:
        """Eq. 10 into Eq. 5 on the selected positions of ``site`` at layer index ``li``."""
        a = self.alpha(site, li, h).unsqueeze(-1)  # (B, P, 1) or (B, P, H, 1)
        return h * (1 + _bcast(beta, h.ndim) * a)
