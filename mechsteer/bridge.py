"""Bridging Hugging Face models with TransformerLens, and the weight processing applied.

``bridge_hf`` wraps an in-memory Hugging Face causal LM as a ``TransformerBridge`` in
compatibility mode (HookedTransformer's hook names). ``mechsteer.models.load_model`` and
``mechsteer.tiny.tiny_model`` both build their models here.

Weight processing applied, and why:

- ``fold_ln=True``: each norm's weight is folded into the linear map that reads it, so
  ``ln*.hook_scale`` is the only thing the norm does to the residual stream. DLA divides
  by that cached scale; AttnLRP's identity rule detaches it. Logits are unchanged.
- ``center_writing_weights``: only on LayerNorm models, where the next LayerNorm removes
  the mean anyway (logits unchanged). On RMSNorm models centring would change logits.
- ``fold_value_biases=True``: value biases move into the output bias (logits unchanged).
- ``center_unembed=False``: centring W_U shifts every logit of a position by the same
  amount; it leaves softmax and logit differences unchanged but not the logits themselves.
  mechsteer's methods explain the model's actual logits, so W_U is left as trained.

One fix for speed, not numbers: the unembedding's input is made contiguous
(``_contiguous_input``). Hugging Face models unembed only the kept positions,
``hidden[:, -k:]``, a strided view; in bfloat16/float16 on CPU, ``F.linear`` on a strided
3-D input turns into a batched matmul that copies W_U once per prompt (measured on
SmolLM2 in bf16: 69% of activation patching's time went to those copies).
"""

from __future__ import annotations

from typing import Any

import torch

from mechsteer import kv_cache


def bridge_hf(
    name: str,
    hf_model: Any,
    tokenizer: Any,
    *,
    device: str | torch.device | None = None,
    default_prepend_bos: bool | None = None,
):
    """Bridge an in-memory Hugging Face causal LM with TransformerLens (no hub access).

    Applies the weight processing described in this module's docstring.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]
    hf_model.eval()
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, device=device
    )
    _process(bridge)
    if default_prepend_bos is not None:
        bridge.cfg.default_prepend_bos = default_prepend_bos
    return bridge


def _process(bridge) -> None:
    is_layernorm = getattr(bridge.cfg, "normalization_type", None) in ("LN", "LNPre")
    bridge.enable_compatibility_mode(
        disable_warnings=True,
        fold_ln=True,
        center_writing_weights=is_layernorm,
        center_unembed=False,
        fold_value_biases=True,
    )
    bridge.eval()
    lm_head = getattr(getattr(bridge, "unembed", None), "original_component", None)
    if isinstance(lm_head, torch.nn.Module):
        lm_head.register_forward_pre_hook(_contiguous_input)
    kv_cache.fix_bridge(bridge)  # TL 4.3 + transformers >= 5.24: cached decoding needs the cache handed over
    for p in bridge.parameters():  # methods ask for gradients where they need them
        p.requires_grad_(False)


def _contiguous_input(module, args):
    """Forward pre-hook: the first argument made contiguous (a no-op when it already is)."""
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None
