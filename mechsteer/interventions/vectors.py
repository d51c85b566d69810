"""Steering vectors: steer by adding a learned vector to activations.

STEERVEC (seed paper 003, Eq. 4) learns one vector v_{l,i}^(s) per intervention point:

    h~_{l,i}^(s) = h_{l,i}^(s) + beta v_{l,i}^(s).

It changes both direction and magnitude of h, and costs d_model parameters per location
(d_head per head for ``z``) where ActivScalar costs one: for GPT2-XL's shape at one site
and 19 positions, 48 * 19 * 1600 = 1,459,200 against 912. The vectors are tied to token
positions, so a SteerVec only runs on prompts of the length it was built for (``n_pos``).

>>> SteerVec(sites=["mlp_out"], n_layers=48, d_model=1600, n_pos=19).n_params
1459200
"""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from mechsteer.interventions.base import Intervention


class SteerVec(Intervention):
    """Eq. 4: h~ = h + beta v, one vector v per (site, layer, pos)."""

    position_bound = True

    def param_shape(self, site: str) -> tuple[int, ...]:
        # (layer, pos, d_model) or (layer, pos, head, d_head)
        return (len(self.layers), self.n_sel_pos) + self.site_tail(site)

    def vectors(self, site: str) -> Float[Tensor, "layer pos *d"]:
        """The vectors v of ``site``: (layer, pos, d_model) or (layer, pos, head, d_head)."""
        return self.params[site]

    def edit(
        self, site: str, li: int, h: Float[Tensor, "batch pos *tail"], beta: Float[Tensor, " batch"]
    ) -> Float[Tensor, "batch pos *tail"]:
        """Eq. 4 on the selected positions of ``site`` at layer index ``li``."""
        v = self.params[site][li].to(dtype=h.dtype, device=h.device)  # (P, *tail)
        return h + beta.view(-1, *([1] * (h.ndim - 1))) * v
