"""The run layer: every way mechsteer runs a model, written once.

Methods (patching, AtP, DLA, AttnLRP, AIE, the intervention interpreters) say *what* they
need; this module runs it:

- ``cache_at(model, tokens, sites)``: one forward storing the activations at those sites
  only (optionally reduced by ``keep``, e.g. the last position), nothing else.
- ``grad_at(model, tokens, sites, objective)``: one forward + backward giving the
  activations a and d objective / d a at those sites. A zero tensor delta is added at each
  site (a + delta has a's value) and the gradient taken with respect to delta, which is
  d objective / d a without retaining grads on the model's own tensors.
- ``skip_blocks_below`` / ``skipping_works``: run ``start_at_layer=l`` without executing
  blocks 0..l-1 (the TransformerLens 4 bridge runs and discards them otherwise).
- ``PrefixKV``: a run's own keys and values, reused for an unchanged prefix (through
  ``mechsteer.kv_cache``, the one module that touches cache objects).
- ``float32_logits``: a half-precision model's logits computed in float32 (its
  unembedding with a float32 copy of W_U), so metrics see the residual stream's
  precision, not bf16's 8 significant bits of each logit.
- ``batch_rows``: rows per forward from a memory budget (``max_memory=``, bytes or
  ``"2GB"``; default a share of the free device memory: ``memory_budget``); ``timer``,
  ``plain_forward_seconds``: timing, for costs in forward equivalents.

A *site* here is a hook name (``sites.hook_name("z", 3)``) or a ``(site, layer)`` pair;
results are keyed by what was passed. Every run goes through ``sites.hooked``: scoped, and
checked that each hook fired.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Callable, Hashable, Iterable, Iterator, Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from mechsteer import kv_cache
from mechsteer.precision import float32_logits, logit_atol  # noqa: F401 (float32_logits: part of the run layer)
from mechsteer.sites import hook_name, hooked

SiteKey = Hashable  # a hook name, or a (site, layer) pair
Keep = Callable[[Tensor], Tensor]

# Most memory one chunk may use on CPU when neither batch_size nor max_memory is given (a
# quarter of the available host memory below that; on CUDA a quarter of the free memory).
# On CPU, rows beyond a few hundred tokens' worth gain little.
CPU_BUDGET_BYTES = 128 * 2**20


def _names(model, sites: Iterable[SiteKey]) -> dict[SiteKey, str]:
    out = {}
    for key in sites:
        out[key] = hook_name(key[0], key[1], model) if isinstance(key, tuple) else key
    if not out:
        raise ValueError("sites is empty: name at least one site to run at.")
    return out


def _keep_for(keep: Keep | Mapping[SiteKey, Keep] | None, key: SiteKey) -> Keep | None:
    return keep.get(key) if isinstance(keep, Mapping) else keep


def cache_at(
    model, tokens: Tensor, sites: Iterable[SiteKey], *, keep: Keep | Mapping[SiteKey, Keep] | None = None,
    **forward_kwargs,
) -> tuple[object, dict[SiteKey, Tensor]]:
    """One forward of ``tokens`` storing the (detached) activations at ``sites`` only.

    ``keep`` reduces each activation before it is stored (one callable, or one per site),
    e.g. ``lambda a: a[:, -1]`` for the last position. Returns ``(model output, store)``.

    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("gpt2"); tokens = model.to_tokens("Hello there")
    >>> _, acts = cache_at(model, tokens, [("z", 1), "blocks.0.hook_attn_out"], keep=lambda a: a[:, -1])
    >>> tuple(acts[("z", 1)].shape), tuple(acts["blocks.0.hook_attn_out"].shape)
    ((1, 4, 16), (1, 64))
    """
    names = _names(model, sites)
    store: dict[SiteKey, Tensor] = {}

    def saver(key: SiteKey):
        fn = _keep_for(keep, key)

        def save(x, hook):  # close over the key registered, never hook.name (canonical on the bridge)
            x = x.detach()
            store[key] = fn(x) if fn is not None else x

        return save

    with hooked(model, [(names[k], saver(k)) for k in names]):
        out = model(tokens, **forward_kwargs)
    return out, store


def grad_at(
    model, tokens: Tensor, sites: Iterable[SiteKey], objective: Callable[[Tensor], Tensor], *,
    pos: int | None = None, **forward_kwargs,
) -> tuple[Tensor, dict[SiteKey, Tensor], dict[SiteKey, Tensor]]:
    """Activations a and gradients d objective / d a at ``sites`` from one forward + backward.

    ``objective(logits)`` returns a tensor; the gradient is of its sum (so a per-prompt
    objective keeps each prompt's own gradient). With ``pos``, only that position's
    activation gets the zero delta, and a and its gradient are returned at ``pos`` alone.
    A site the objective does not depend on gets a zero gradient. Returns
    ``(objective value (detached), acts, grads)``.

    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("gpt2"); tokens = model.to_tokens("Hello there")
    >>> value, acts, grads = grad_at(model, tokens, [("attn_out", 0)], lambda f: f[:, -1, 0])
    >>> grads[("attn_out", 0)].shape == acts[("attn_out", 0)].shape
    True
    """
    names = _names(model, sites)
    acts: dict[SiteKey, Tensor] = {}
    deltas: dict[SiteKey, Tensor] = {}

    def add_delta(key: SiteKey):
        def fn(x: Tensor, hook) -> Tensor:
            at = x if pos is None else x[:, pos]
            acts[key] = at.detach()
            deltas[key] = torch.zeros_like(acts[key], requires_grad=True)
            if pos is None:
                return x + deltas[key]  # same value; d objective/d delta = d objective/d x
            out = x.clone()
            out[:, pos] = at + deltas[key]
            return out

        return fn

    with torch.enable_grad():
        with hooked(model, [(names[k], add_delta(k)) for k in names]):
            logits = model(tokens, **forward_kwargs)
        value = objective(logits)
        grads = torch.autograd.grad(value.sum(), [deltas[k] for k in names], allow_unused=True)
    grad = {k: torch.zeros_like(acts[k]) if g is None else g for k, g in zip(names, grads)}
    return value.detach(), acts, grad


def gather(tensors: Iterable[Tensor], dim: int = 0) -> Tensor:
    """``torch.stack`` of per-layer tensors that may live on different devices (a model
    split over several GPUs by ``device_map``): each is moved to the first one's device."""
    tensors = list(tensors)
    return torch.stack([t.to(tensors[0].device) for t in tensors], dim)


# ---- timing -----------------------------------------------------------------------------
@contextlib.contextmanager
def timer() -> Iterator[dict[str, float]]:
    """``with timer() as t: ...`` then ``t["seconds"]``."""
    out = {"seconds": float("nan")}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start


@torch.no_grad()
def plain_forward_seconds(model, tokens: Tensor, repeats: int = 3) -> float:
    """Median wall time of one plain forward pass of ``tokens`` (after one warm-up)."""
    model(tokens)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(tokens)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# ---- memory -----------------------------------------------------------------------------
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(max_memory: int | float | str) -> int:
    """Bytes of a budget given as a number or a string: ``"2GB"`` (10^9), ``"512MiB"``
    (2^20), ``"1.5G"`` (2^30), ``"4096"``, as accelerate's ``max_memory`` reads them.

    >>> parse_bytes("2GB"), parse_bytes("512MiB"), parse_bytes(1024)
    (2000000000, 536870912, 1024)
    """
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, float, str)):
        raise TypeError(f"max_memory must be bytes (a number) or a string such as '2GB' or '512MiB', "
                        f"got {max_memory!r} ({type(max_memory).__name__}).")
    text = str(max_memory).strip().replace(" ", "").replace("_", "")
    number = text.rstrip("BbIiKkMmGgTt")
    unit = text[len(number):].upper()
    try:
        value = float(number) * UNITS[unit]
    except (KeyError, ValueError):
        value = float("nan")
    if not value > 0 or value == float("inf"):  # (NaN fails too)
        raise ValueError(f"max_memory must be a positive number of bytes or a string such as '2GB', '512MiB', "
                         f"'1.5G', got {max_memory!r}.")
    return int(value)


def free_memory(device: str | torch.device) -> int:
    """Bytes free now on ``device``: CUDA's ``mem_get_info``, else the host's available
    memory (psutil, else ``/proc/meminfo``'s MemAvailable; 4 GiB when neither is there)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def memory_budget(device: str | torch.device, max_memory: int | float | str | None = None) -> int:
    """Bytes one chunk of a run may use: ``max_memory`` when given, else a share of what
    is free: a quarter of the free CUDA memory, or on CPU a quarter of the available host
    memory capped at ``CPU_BUDGET_BYTES`` (more rows per forward gain little on CPU).

    >>> memory_budget("cpu", "64MiB")
    67108864
    >>> 0 < memory_budget("cpu") <= CPU_BUDGET_BYTES
    True
    """
    if max_memory is not None:
        return parse_bytes(max_memory)
    free = free_memory(device) // 4
    return free if torch.device(device).type == "cuda" else max(1, min(free, CPU_BUDGET_BYTES))


def row_bytes(model, n_pos: int, keep_logits: int) -> int:
    """Estimated bytes one prompt (row) holds live in a forward: one block's activations
    (residual, attention scores, MLP hidden) at the model's dtype, plus ``keep_logits``
    positions of float32 logits."""
    cfg = model.cfg
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    param = next(iter(model.parameters()), None)
    itemsize = param.element_size() if param is not None and param.is_floating_point() else 4
    per_token = 8 * cfg.d_model + 3 * d_mlp + 3 * cfg.n_heads * n_pos  # live values in one block
    return itemsize * n_pos * per_token + 4 * keep_logits * cfg.d_vocab


def batch_rows(model, n_pos: int, n_prompts: int, keep_logits: int, batch_size: int | None, *,
               max_memory: int | float | str | None = None) -> int:
    """Rows (prompts) per forward: ``batch_size``, or as many as fit the memory budget
    (``max_memory``: bytes or a string like ``"2GB"``; default ``memory_budget``'s share
    of the free memory of the model's device), rounded down to a multiple of
    ``n_prompts`` (at least ``n_prompts``).

    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("gpt2")
    >>> batch_rows(model, 8, 4, 1, None, max_memory="1MiB") < batch_rows(model, 8, 4, 1, None, max_memory="64MiB")
    True
    """
    if batch_size is None:
        budget = memory_budget(torch.device(model.cfg.device), max_memory)
        batch_size = budget // row_bytes(model, n_pos, keep_logits)
    elif batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of prompts per forward, got {batch_size}.")
    return max(1, batch_size // n_prompts) * n_prompts


# ---- start at a layer: skip the blocks below ----------------------------------------------
def _passthrough(fmt: tuple[str, int]) -> Callable:
    def forward(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden if fmt[0] == "tensor" else (hidden,) + (None,) * (fmt[1] - 1)

    return forward


@contextlib.contextmanager
def skip_blocks_below(model, layer: int, fmt: tuple[str, int] | None) -> Iterator[None]:
    """Blocks ``0..layer-1`` return their input unchanged inside the ``with`` (restored on
    exit). Only for ``start_at_layer=layer`` runs, whose block ``layer`` discards that input.
    ``fmt`` is the blocks' output structure (``skipping_works``); None skips nothing."""
    if fmt is None or layer == 0:
        yield
        return
    # Written to the instance __dict__ (shadowing the class's forward), never by setattr:
    # bridge components forward setattr to the wrapped Hugging Face module.
    blocks = list(model.blocks)[:layer]
    saved = [b.__dict__.get("forward") for b in blocks]
    try:
        for b in blocks:
            b.__dict__["forward"] = _passthrough(fmt)
        yield
    finally:
        for b, old in zip(blocks, saved):
            if old is None:
                b.__dict__.pop("forward", None)
            else:
                b.__dict__["forward"] = old


@torch.no_grad()
def skipping_works(
    model, resid: Float[Tensor, "batch pos d_model"], layer: int, who: str = "activation_patching"
) -> tuple[str, int] | None:
    """The blocks' output structure if skipping the blocks below ``layer`` leaves
    ``model(resid, start_at_layer=layer)`` unchanged, else None (with a warning)."""
    seen: list = []
    handle = model.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(out))
    try:  # a plain torch hook that reads the output's structure, never its values
        reference = model(resid, start_at_layer=layer)
    finally:
        handle.remove()
    out = seen[0] if seen else None
    fmt = ("tensor", 1) if isinstance(out, Tensor) else ("tuple", len(out)) if isinstance(out, tuple) else None
    if fmt is not None:
        with skip_blocks_below(model, layer, fmt):
            skipped = model(resid, start_at_layer=layer)
        if skipped.shape == reference.shape and torch.allclose(skipped, reference, atol=logit_atol(model, reference, 1e-5), rtol=0):
            return fmt
    warnings.warn(f"{who}: skipping the blocks below the patched layer changed the logits "
                  "on this model; every patched run executes all blocks (same numbers, slower).", stacklevel=3)
    return None


# ---- start at a position: reuse the prefix's keys and values --------------------------------
class PrefixKV:
    """A run's own keys and values, served as a KV cache for a prefix of it."""

    def __init__(self, prefix: kv_cache.PrefixCache, who: str = "activation_patching") -> None:
        self.prefix, self.who = prefix, who

    @classmethod
    def of(cls, past, n_prompts: int, n_pos: int, who: str = "activation_patching") -> "PrefixKV | None":
        """A ``PrefixKV`` of the run's returned cache, or None with one warning naming why not."""
        prefix = kv_cache.PrefixCache.of(past, n_prompts, n_pos, who=who)
        return None if prefix is None else cls(prefix, who)

    def cache(self, prompts: Tensor, start: int, layer: int):
        """A cache holding positions ``0..start-1`` of ``prompts`` (one row each); layers
        below ``layer`` are skipped, so they get cheap placeholders of the right length."""
        return self.prefix.cache(prompts, start, layer)

    @torch.no_grad()
    def works(self, model, resid: Tensor, logits: Tensor, fmt) -> bool:
        """Resuming prompt 0 from the last block at mid-prompt gives its logits."""
        layer, start = model.cfg.n_layers - 1, resid.shape[1] // 2
        if start == 0:  # one-token prompts: no prefix to reuse
            return True
        prompts = torch.zeros(1, dtype=torch.long, device=resid.device)
        with skip_blocks_below(model, layer, fmt), kv_cache.bridged(model):
            out = model(resid[:1, start:], start_at_layer=layer, past_key_values=self.cache(prompts, start, layer))
        ref = logits[:1, start:]
        if out.shape[1:] == ref.shape[1:] and torch.allclose(out, ref, atol=logit_atol(model, ref, 1e-4), rtol=0):
            return True
        warnings.warn(f"{self.who}: reusing the keys and values of unchanged positions changed the "
                      "logits on this model; every patched run recomputes all positions (same numbers, slower).",
                      stacklevel=3)
        return False
