"""KV-cache reuse on public ground: the one module that touches Hugging Face cache objects.

Three places reuse keys and values instead of recomputing them: activation patching and
fast AIE resume a patched run from the first position it changes (the unchanged prefix's
keys and values come from the unpatched run), and steered generation decodes one token
at a time. All three are optimisations: each checks on one prompt that reuse leaves the
logits unchanged, and otherwise falls back to the plain path with one warning that says
why (same numbers, slower).

Public ``transformers`` calls relied on (``Cache`` / ``DynamicCache``, unchanged 5.9-5.24):

- ``DynamicCache()`` and ``Cache.update(keys, values, layer_idx)`` to build a cache;
- iterating a ``DynamicCache`` yields each layer's ``(keys, values, ...)`` as tensors of
  shape ``(batch, kv_head, pos, d_head)`` (its documented DDP protocol);
- ``len(cache)``, ``Cache.get_seq_length(layer_idx)``, ``Cache.is_sliding``.

Nothing here reads a layer object's attributes (``.layers[i].keys`` was left ``None`` by
5.24 until first use, which is what broke the prefix reuse).

**Why** ``bridged``: from transformers 5.24 a decoder layer hands the cache to its attention
module as ``cache=`` (it was ``past_key_values=``); TransformerLens 4.3's attention bridges
read ``past_key_values`` only, so the bridge's cache stays empty and cached decoding
attends to the newest token alone (``model.generate(use_past_kv_cache=True)`` returns
other tokens than uncached decoding, silently). ``bridged(model)`` hands the cache over
under the old name for the duration of a ``with`` block, through torch forward pre-hooks
on the attention modules (removed on exit, also on an exception). It changes nothing on
versions that still pass ``past_key_values``.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Iterator

import torch
from torch import Tensor

__all__ = ["bridged", "fix_bridge", "PrefixCache", "reuse_problem", "cached_decoding_works", "use_cache_for",
           "last_logits"]


_FIXED = "_mechsteer_cache_kwarg_fixed"  # set by fix_bridge on an attention module


def _rename_cache_kwarg(module, args, kwargs):
    if "cache" in kwargs and "past_key_values" not in kwargs:
        kwargs = dict(kwargs)
        kwargs["past_key_values"] = kwargs.pop("cache")
        return args, kwargs
    return None


def _attention_modules(model) -> list[torch.nn.Module]:
    blocks = getattr(model, "blocks", None) or []
    return [b.attn for b in blocks if isinstance(getattr(b, "attn", None), torch.nn.Module)]


@contextlib.contextmanager
def bridged(model) -> Iterator[None]:
    """Inside the ``with``, the bridge's attention modules receive the KV cache under the
    keyword TransformerLens reads (see the module docstring). Nesting is harmless.

    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("llama")
    >>> tokens = model.to_tokens("Mary and John went")
    >>> with bridged(model):
    ...     cached = model.generate(tokens, max_new_tokens=4, do_sample=False, verbose=False)
    >>> plain = model.generate(tokens, max_new_tokens=4, do_sample=False, verbose=False, use_past_kv_cache=False)
    >>> torch.equal(cached, plain)
    True
    """
    handles = [m.register_forward_pre_hook(_rename_cache_kwarg, with_kwargs=True)
               for m in _attention_modules(model) if not m.__dict__.get(_FIXED)]  # fix_bridge's need none
    try:
        with warnings.catch_warnings():  # TransformerLens' own use of the old keyword, not the caller's
            warnings.filterwarnings("ignore", message=r".*past_key_values.* is deprecated", category=FutureWarning)
            yield
    finally:
        for h in handles:
            h.remove()


def fix_bridge(model) -> None:
    """Hand the cache over permanently on ``model`` (``load_model`` and the tiny models do
    this, so a user's own ``model.generate`` decodes correctly too). Idempotent; a torch
    pre-hook on each attention module, not a TransformerLens hook (``reset_hooks`` keeps it)."""
    for m in _attention_modules(model):
        if not m.__dict__.get(_FIXED):
            m.register_forward_pre_hook(_rename_cache_kwarg, with_kwargs=True)
            m.__dict__[_FIXED] = True  # the instance dict: bridge components forward setattr to HF


def reuse_problem(past, n_prompts: int, n_pos: int) -> str | None:
    """Why ``past`` (a forward's returned cache) cannot serve prefixes of its prompts, or
    None when it can: a ``DynamicCache`` of full-attention layers holding every prompt's
    ``n_pos`` positions. (A sliding-window layer keeps only recent positions, so a prefix
    of it is not the prompt's prefix.)"""
    try:
        from transformers import DynamicCache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return "transformers has no DynamicCache"
    if past is None:
        return "the model returned no KV cache"
    if type(past) is not DynamicCache:
        return f"unknown cache class {type(past).__name__} (only transformers.DynamicCache is reused)"
    if any(past.is_sliding):
        return "the cache has sliding-window layers"
    if len(past) == 0 or any(past.get_seq_length(i) != n_pos for i in range(len(past))):
        got = sorted({past.get_seq_length(i) for i in range(len(past))})
        return f"the cache holds {got} positions per layer after the run, not the prompts' {n_pos}"
    for entry in past:
        keys, values = entry[0], entry[1]
        if not (isinstance(keys, Tensor) and isinstance(values, Tensor)) or keys.shape[0] != n_prompts:
            return "the cache's layers are not (batch, kv_head, pos, d_head) tensors of every prompt"
    return None


class PrefixCache:
    """Keys and values of a run, served as a fresh ``DynamicCache`` for a prefix of it.

    ``past`` must pass ``reuse_problem``. The tensors are read once (by iteration) and
    each ``cache(...)`` call builds a new cache with ``update``, so the run's own cache is
    never modified.
    """

    def __init__(self, past) -> None:
        self.kv: list[tuple[Tensor, Tensor]] = [(entry[0], entry[1]) for entry in past]

    @classmethod
    def of(cls, past, n_prompts: int, n_pos: int, *, who: str) -> "PrefixCache | None":
        """A ``PrefixCache`` of ``past``, or None with one warning naming why not."""
        problem = reuse_problem(past, n_prompts, n_pos)
        if problem is None:
            return cls(past)
        warnings.warn(f"{who}: not reusing the keys and values of unchanged positions ({problem}); "
                      "every patched run recomputes all positions (same numbers, slower).", stacklevel=3)
        return None

    def cache(self, prompts: Tensor, start: int, layer: int = 0):
        """A cache of positions ``0..start-1`` of ``prompts`` (one row each). Layers below
        ``layer`` are skipped by the caller's run, so they get one-row placeholders of the
        right length (the model reads only their length: positions and mask)."""
        from transformers import DynamicCache

        c = DynamicCache()
        for i, (k, v) in enumerate(self.kv):
            if i < layer:
                c.update(k[:1, :, :start], v[:1, :, :start], i)
            else:
                c.update(k[prompts, :, :start], v[prompts, :, :start], i)
        return c


_DECODING: "weakref.WeakKeyDictionary[object, str | None]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def cached_decoding_works(model, *, who: str = "generation") -> bool:
    """Whether one-token decoding from the model's KV cache gives the logits of a full
    forward on this model (checked once per model on a 4-token input, inside ``bridged``).
    When it does not, warns once naming why; callers then decode without the cache."""
    if model not in _DECODING:
        _DECODING[model] = _decoding_problem(model)
        if _DECODING[model] is not None:
            warnings.warn(f"{who}: cached decoding is off on this model ({_DECODING[model]}); every step re-runs "
                          "the whole sequence (same tokens, slower).", stacklevel=3)
    return _DECODING[model] is None


def use_cache_for(model, use_past_kv_cache: bool = True, *, who: str = "generation") -> bool:
    """The ``use_past_kv_cache`` to give ``model.generate``: the caller's wish, unless cached
    decoding is wrong on this model (then False, with one warning). Call it *before*
    entering a steering context (its check runs the model unsteered), and generate
    inside ``bridged(model)``."""
    return bool(use_past_kv_cache) and cached_decoding_works(model, who=who)


MIN_SHARED = 4  # shorter common prefixes are not worth a second forward


@torch.no_grad()
def last_logits(model, tokens: Tensor, *, share_prefix: bool = False) -> Tensor:
    """Logits ``(B, d_vocab)`` at the last position of equal-length ``tokens`` ``(B, T)``.

    With ``share_prefix``, the longest token prefix common to every row (a chat template's
    system prompt, an instruction) runs once, for one row, and every row continues from its
    keys and values: the same logits to float rounding, for the cost of the suffixes.
    Plain forward when the rows share under ``MIN_SHARED`` tokens or cached decoding is
    off on this model. Only for unsteered runs: a hook that reads positions (an injection
    at "the last token") would see the prefix and the suffix as two sequences.
    """
    B, T = tokens.shape
    if share_prefix and T > MIN_SHARED:
        same = (tokens == tokens[:1]).all(0).long().cumprod(0)  # (T,): 1 while every row agrees
        c = min(int(same.sum()), T - 1)
        if c >= MIN_SHARED and cached_decoding_works(model, who="shared-prefix forward"):
            with bridged(model):
                _, past = model(tokens[:1, :c], return_type="logits_and_cache", logits_to_keep=1)
                if reuse_problem(past, 1, c) is None:
                    rows = torch.zeros(B, dtype=torch.long, device=tokens.device)
                    cache = PrefixCache(past).cache(rows, c)
                    return model(tokens[:, c:], past_key_values=cache, logits_to_keep=1)[:, -1]
    return model(tokens, logits_to_keep=1)[:, -1]


def _decoding_problem(model) -> str | None:
    device = torch.device(model.cfg.device)
    tokens = torch.arange(1, 5, device=device)[None] % model.cfg.d_vocab  # (1, 4)
    try:
        with bridged(model):
            full = model(tokens)
            _, past = model(tokens[:, :3], return_type="logits_and_cache")
            problem = reuse_problem(past, 1, 3)
            if problem is not None:
                return problem
            step = model(tokens[:, 3:], past_key_values=PrefixCache(past).cache(torch.zeros(1, dtype=torch.long, device=device), 3))
    except (TypeError, ValueError, RuntimeError, AttributeError) as err:  # a bridge without cache support
        return f"a cached forward raised {type(err).__name__}: {err}"
    exact = full.dtype in (torch.float32, torch.float64)  # else half precision: a looser, relative bound
    full, step = full[:, -1].float(), step[:, -1].float()
    tol = (1e-3 if exact else 5e-2) * float(full.abs().max()) + 1e-4
    if step.shape != full.shape or float((step - full).abs().max()) > tol:
        return "the cached step's logits differ from a full forward's"
    return None
