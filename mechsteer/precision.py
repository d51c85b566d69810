"""Half precision: what mechsteer keeps in float32 when the model runs in bf16 or fp16.

Parameters and activations keep the model's dtype (that is what makes half precision
fast and small); what is *accumulated* is widened to float32: metrics of the logits
(``metrics._wide`` before a softmax), gradient x activation products (AtP), relevance
sums (AttnLRP), DLA's dot products, KL divergences. ``float32_logits`` also computes the
logits themselves in float32 from the half-precision final residual: bf16 keeps 8
significant bits, so a logit near 20 is a multiple of 1/8, coarser than most single
heads' effect on a logit difference (activation patching in bf16 on SmolLM2 agreed with
float32 at Spearman 0.76 reading bf16 logits, 0.86 reading float32 ones; the rest is
the bf16 residual stream's own rounding).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

HALF = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def float32_logits(model) -> Iterator[None]:
    """Inside the ``with``, a bf16/fp16 model's logits come out in float32: its unembedding
    computes x W_U + b_U from its (half-precision) input x with a float32 copy of W_U
    (made once on entry, freed on exit: vocab x d_model x 4 bytes), instead of rounding
    every logit to 8 significant bits (bf16; a logit near 20 is then a multiple of 1/8).
    Activations and everything else keep the model's dtype. A float32 model, and an
    unembedding under an accelerate hook (``device_map`` offload), are left as they are.

    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("llama").to(torch.bfloat16)
    Changing model dtype to torch.bfloat16
    >>> with float32_logits(model):
    ...     model(model.to_tokens("Hi")).dtype
    torch.float32
    """
    head = getattr(getattr(model, "unembed", None), "original_component", None)
    weight = getattr(head, "weight", None)
    if (not isinstance(head, torch.nn.Linear) or weight is None or weight.dtype not in HALF
            or weight.device.type == "meta" or hasattr(head, "_hf_hook") or "forward" in head.__dict__):
        yield
        return
    w32 = weight.detach().float()
    b32 = None if head.bias is None else head.bias.detach().float()

    def forward(x: Tensor) -> Tensor:  # (..., d_model) -> (..., vocab), float32
        return F.linear(x.to(w32.device).float(), w32, b32)

    head.__dict__["forward"] = forward  # instance attribute: bridge setattr goes to the HF module
    try:
        yield
    finally:
        head.__dict__.pop("forward", None)


def logit_atol(model, ref: Tensor, atol: float) -> float:
    """``atol`` for a float32 model; on a bf16/fp16 one, one unit in the last place of the
    largest |logit| at the model's dtype (another summation order of the same run moves
    a logit by less: SmolLM2 in bf16 resumed from its KV cache matches exactly, while
    a resume that loses the cached prefix misses by 3.6 against this 0.19)."""
    dtype = model_dtype(model)
    return atol if dtype not in HALF else torch.finfo(dtype).eps * max(1.0, ref.abs().max().item())


def model_dtype(model) -> torch.dtype:
    """The dtype of the model's (first floating-point) parameters; float32 if it has none."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def wide(x: Tensor) -> Tensor:
    """``x`` in float32, or its own dtype when wider: what sums and products accumulate in."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
