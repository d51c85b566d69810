"""AttnLRP's propagation rules as gradient modifications (Achtibat et al., 2024).

LRP redistributes the explained output f(x) backwards, layer by layer, as relevances R.
For a layer that is linear in its input (no bias), ``R_i = x_i * df/dx_i`` is exactly
LRP's epsilon-rule, so LRP of a whole network can be computed as *gradient x input* with
a *modified* gradient wherever a layer is not linear. Each rule below is a value-identical
function: its forward value is exactly the original tensor, only the gradient changes.

- **Identity rule** (Eq. 9, element-wise non-linearities ``y = act(x)``): pass the
  relevance through unchanged, ``R_x = R_y``. In gradient x input form the local gradient
  is ``act(x) / x``; the ``*_ratio`` functions give it in closed form (``sigmoid(x)`` for
  SiLU, ``Phi(x)`` for GELU), so nothing divides by x and x = 0 is finite.
- **Identity rule on normalisers** (LayerNorm / RMSNorm): treat the scale
  ``sqrt(mean(x^2) + eps)`` as a constant (``freeze_grad``); what remains is linear.
- **Uniform rule** (Eq. 7, a product of two activations ``y = a * b`` such as Q.K^T, A.V
  or the gated MLP's ``act(gate) * up``): half of ``R_y`` to each factor, which in
  gradient x input form is ``scale_grad(., 1/2)`` on each factor (``uniform_rule``).
- **CP-LRP** (Ali et al., 2022): the attention weights are constants (``freeze_grad``), so
  A.V is linear in V and all relevance flows through the values. lxt's CP-LRP also makes
  the gated MLP's gate act(gate) a constant (``frozen_gate_rule``): all of the
  product's relevance flows through the up projection.

The softmax and linear layers keep their plain gradient (AttnLRP's softmax rule is
gradient x input; its bias term is what makes AttnLRP only approximately conservative).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

T = Float[Tensor, "..."]


def grad_from(value: T, surrogate: T) -> T:
    """Forward value exactly ``value``; gradient that of ``surrogate`` (same shape).

    ``value.detach() + (surrogate - surrogate.detach())``: the bracket is exactly 0.
    The building block of every rule below.
    """
    return value.detach() + (surrogate - surrogate.detach())


def freeze_grad(x: T) -> T:
    """Identity rule on a normaliser's scale, and CP-LRP's constant attention: dx := 0.

    On ``ln*.hook_scale`` it turns ``x / scale`` into a linear map, so the norm passes
    relevance through unchanged (the eps inside the scale plays no role).
    """
    return x.detach()


def constant(x: T) -> T:
    """``freeze_grad`` that is still a leaf asking for gradient: the gradient *arriving*
    at x can be read (CP-LRP's heads readout), none flows on into x's inputs."""
    return x.detach().requires_grad_(True)


def scale_grad(x: T, s: float) -> T:
    """Value x, gradient ``s * dx``: the uniform rule's share (Eq. 7) placed on one factor."""
    d = x.detach()
    return d + s * (x - d)


def halve_grad(x: T) -> T:
    """Value x, gradient ``dx / 2``: one factor's half of a two-activation product."""
    return scale_grad(x, 0.5)


def silu_ratio(x: T) -> T:
    """``silu(x) / x = sigmoid(x)``: the identity rule's local gradient for SiLU (llama)."""
    return torch.sigmoid(x)


def gelu_ratio(x: T) -> T:
    """``gelu(x) / x = Phi(x) = (1 + erf(x / sqrt 2)) / 2`` for the exact (erf) GELU."""
    return 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


def gelu_tanh_ratio(x: T) -> T:
    """``gelu(x) / x = (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2`` for GPT-2's tanh GELU."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def relu_ratio(x: T) -> T:
    """``relu(x) / x = 1[x > 0]`` (equal to ReLU's plain gradient)."""
    return (x > 0).to(x.dtype)


# TransformerLens' ``cfg.act_fn`` name -> act(x) / x in closed form.
ACT_RATIOS = {
    "silu": silu_ratio,
    "swish": silu_ratio,
    "gelu": gelu_ratio,
    "gelu_new": gelu_tanh_ratio,
    "gelu_fast": gelu_tanh_ratio,
    "gelu_pytorch_tanh": gelu_tanh_ratio,
    "relu": relu_ratio,
}


def identity_rule(x: T, y: T, ratio) -> T:
    """Identity rule (Eq. 9) on ``y = act(x)``: value y, gradient ``ratio(x) * dy`` into x.

    ``ratio(x) = act(x) / x`` (one of ``ACT_RATIOS``), so ``x * dy/dx = y``: R_x = R_y.
    """
    return grad_from(y, x * ratio(x).detach())


def uniform_rule(a: T, b: T, ab: T) -> T:
    """Uniform rule (Eq. 7) on ``ab = a * b``: value ab, half the relevance to each factor.

    Gradients ``b * dab / 2`` into a and ``a * dab / 2`` into b, so R_a = R_b = R_ab / 2.
    """
    return grad_from(ab, 0.5 * (a * b.detach() + a.detach() * b))


def gated_rule(gate: T, up: T, out: T, ratio) -> T:
    """Gated MLP ``out = act(gate) * up``: identity rule on act, uniform rule on the product.

    Relevance: ``R_gate = R_up = R_out / 2``.
    """
    activated = identity_rule(gate, gate * ratio(gate), ratio)  # value act(gate), d/dgate = ratio
    return uniform_rule(activated, up, out)


def frozen_gate_rule(gate: T, up: T, out: T, ratio) -> T:
    """Gated MLP ``out = act(gate) * up`` as lxt's CP-LRP: the gate is a constant.

    Value ``out``; gradient ``act(gate) * dout`` into up and none into gate, so
    ``R_up = R_out`` and ``R_gate = 0`` (lxt's ``cp_gated_mlp_forward`` detaches
    ``gate_proj(x)``). ``act(gate) = gate * ratio(gate)``, one of ``ACT_RATIOS``.
    """
    return grad_from(out, (gate * ratio(gate)).detach() * up)


def silu_identity(x: T) -> T:
    """SiLU with the identity rule: value ``silu(x)``, gradient ``sigmoid(x)``.

    >>> x = torch.tensor([0.0, 2.0], requires_grad=True)
    >>> silu_identity(x).sum().backward()
    >>> x.grad
    tensor([0.5000, 0.8808])
    """
    return identity_rule(x, F.silu(x), silu_ratio)


def gelu_identity(x: T, approximate: str = "none") -> T:
    """GELU with the identity rule: value ``gelu(x)``, gradient ``gelu(x) / x`` (0.5 at 0).

    ``approximate="tanh"`` is GPT-2's ``gelu_new``.
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}.")
    ratio = gelu_tanh_ratio if approximate == "tanh" else gelu_ratio
    return identity_rule(x, F.gelu(x, approximate=approximate), ratio)
