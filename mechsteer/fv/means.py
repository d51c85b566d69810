"""Mean head activations: the per-head task representations of function vectors.

Todd et al. (2024) and "Fast & Faithful Function Vectors" (Sec. 3.1) represent a task by
what each attention head writes at the prediction position, averaged over the task's
prompts:

    mean_z[l, h] = (1 / |P_t|) * sum_{p in P_t} z_{l,h}(p)[-1]

where ``z_{l,h}(p)[-1]`` is head (l, h)'s ``hook_z`` output (the attention-weighted values,
before ``W_O``) at the last token of prompt p. These means are what a function vector adds
back (sum of W_O-projected top heads, or each head at its own place), and what AIE patches
into corrupted prompts to find the heads that carry the task (``mechsteer.fv.indirect_effect``).

Only the ``hook_z`` of every layer is hooked, and only its last position is kept, so the
memory cost is ``batch x layer x head x d_head`` floats, not a full activation cache.
Prompts are unpadded: ``FVPrompts.batches`` groups prompts of one token length, so
position -1 is every prompt's last token (no padding mask to get wrong).

The helpers here (``last_z``, the checks) are shared by the head scores in
``mechsteer.fv.indirect_effect`` and ``mechsteer.fv.scores``; P(answer) is
``mechsteer.metrics.answer_prob`` (``reduce="none"``: one value per prompt).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechsteer._validate import check_finite, nonneg_int, positive_int
from mechsteer.runs import cache_at
from mechsteer.tasks.fv import FVPrompts


def check_prompts(model, prompts: FVPrompts, what: str = "prompts") -> None:
    """ValueError unless ``prompts`` is a non-empty ``FVPrompts`` with one answer per prompt."""
    if not isinstance(prompts, FVPrompts):
        raise TypeError(f"{what} must be FVPrompts (mechsteer.tasks.fv), got {type(prompts).__name__}.")
    if len(prompts) == 0:
        raise ValueError(f"{what} are empty (task {prompts.task!r}, style {prompts.style!r}); pass at least one prompt.")
    if len(prompts.tokens) != len(prompts) or tuple(prompts.answers.shape) != (len(prompts),):
        raise ValueError(
            f"{what} hold {len(prompts)} texts, {len(prompts.tokens)} token rows and answers of shape "
            f"{tuple(prompts.answers.shape)}; expected one token row and one answer id per prompt."
        )
    bad = [i for i, t in enumerate(prompts.tokens) if t.ndim != 1 or len(t) == 0]
    if bad:
        raise ValueError(f"{what}: prompt(s) {bad[:5]} are not non-empty 1-D token tensors.")
    vocab = model.cfg.d_vocab
    if ((prompts.answers < 0) | (prompts.answers >= vocab)).any():
        raise ValueError(f"{what}: answer ids must lie in 0..{vocab - 1}, got {prompts.answers.tolist()}.")
    bad = [i for i, t in enumerate(prompts.tokens) if bool(((t < 0) | (t >= vocab)).any())]
    if bad:
        raise ValueError(f"{what}: prompt(s) {bad[:5]} hold token ids outside the vocabulary 0..{vocab - 1}; "
                         "tokenise them with this model.")


def check_mean_z(model, mean_z: Tensor) -> None:
    """ValueError unless ``mean_z`` is ``(layer, head, d_head)`` for ``model``;
    FloatingPointError if it holds NaN or inf."""
    if not isinstance(mean_z, Tensor):
        raise TypeError(f"mean_z must be a (layer, head, d_head) tensor, got {type(mean_z).__name__}.")
    cfg = model.cfg
    want = (cfg.n_layers, cfg.n_heads, cfg.d_head)
    if tuple(mean_z.shape) != want:
        raise ValueError(
            f"mean_z has shape {tuple(mean_z.shape)}; this model needs (layer, head, d_head) = {want}. "
            "Compute it with mean_head_z(model, prompts) on the same model."
        )
    check_finite("mean_z (the mean head activations)", mean_z)


def check_layers(model, layers: Sequence[int] | None) -> list[int]:
    """The layers to score: all by default, else ``layers`` (sorted, each checked)."""
    n = model.cfg.n_layers
    if layers is None:
        return list(range(n))
    if isinstance(layers, (str, int)):
        raise TypeError(f"layers must be a list of layer indices (or None for all), got {layers!r}.")
    out = sorted({nonneg_int("layers", layer.item() if isinstance(layer, Tensor) else layer) for layer in layers})
    if not out or out[0] < 0 or out[-1] >= n:
        raise ValueError(f"layers must be a non-empty list of layers in 0..{n - 1}, got {list(layers)!r}.")
    return out


def last_z(model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch layer head d_head"]:
    """Every head's ``hook_z`` at the last position, from one forward pass (no other cache).

    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("gpt2")
    >>> tuple(last_z(model, model.to_tokens("Q: hot A:")).shape)
    (1, 2, 4, 16)
    """
    sites = [("z", layer) for layer in range(model.cfg.n_layers)]
    with torch.no_grad():  # the last position only, copied out of the full activation
        _, store = cache_at(model, tokens.to(model.cfg.device), sites, keep=lambda z: z[:, -1].clone(), logits_to_keep=1)
    return torch.stack([store[site] for site in sites], 1)  # (B, L, H, d_head)


def mean_head_z(
    model, prompts: FVPrompts, batch_size: int = 32, progress: bool = True
) -> Float[Tensor, "layer head d_head"]:
    """mean_z[l, h] = mean over prompts p of z_{l,h}(p) at p's last token (Todd et al.).

    One forward per equal-length group of at most ``batch_size`` prompts, hooking only
    ``hook_z``. Returned on the model's device, in float32.

    >>> from mechsteer.tiny import tiny_model
    >>> from mechsteer.tasks.fv import FVPrompts
    >>> model = tiny_model("llama")
    >>> toks = [model.to_tokens(t)[0] for t in ["Q: hot A:", "Q: tall A:"]]
    >>> p = FVPrompts("antonym", "instruction", ["Q: hot A:", "Q: tall A:"], toks,
    ...               torch.tensor([5, 6]), [[], []], [-1, -1], ["hot", "tall"], ["cold", "short"])
    >>> tuple(mean_head_z(model, p, progress=False).shape)
    (2, 4, 16)
    """
    check_prompts(model, prompts)
    batch_size = positive_int("batch_size", batch_size)
    cfg = model.cfg
    total = torch.zeros(cfg.n_layers, cfg.n_heads, cfg.d_head, device=cfg.device, dtype=torch.float32)
    groups = list(prompts.batches(batch_size))
    for _, tokens in tqdm(groups, desc="mean head z", disable=not progress or len(groups) == 1):
        total += last_z(model, tokens).float().sum(0)  # (L, H, d_head)
    return check_finite("mean_head_z: mean head activations", total / len(prompts))
