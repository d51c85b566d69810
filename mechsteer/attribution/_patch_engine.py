"""The engine behind ``activation_patching``: cache once, batch the patched runs, and
recompute only the layers and positions a patch can change.

Why mechsteer has its own engine instead of calling ``transformer_lens.patching``: TL runs
one full forward pass of the whole batch per cell (layer x head x position), each from the
embedding to the unembedding of every position, so patching every head of a 30-layer
model by position costs thousands of full forwards. This engine gives the same numbers
(to float precision; the tests compare) with far less work:

1. **Cache only what is needed**: the source run's activations at the patched site, and
   the residual entering every block, the site's values and the KV cache of the run being
   patched (``cache_run`` through ``hooked``; nothing else is stored).
2. **Batch the patched runs**: for one layer, the rows of a forward are (cell, prompt)
   pairs: row ``r`` is prompt ``r % B`` with cell ``r // B`` patched, by index arithmetic
   in one hook. Rows are chunked to a memory budget (``batch_rows``).
3. **Start at the patched layer**: a patch at layer l cannot change layers below l, so a
   run starts from the cached residual entering block l (``start_at_layer=l``). On the
   TransformerLens 4 bridge that call still *executes* blocks 0..l-1 and discards their
   output, so ``skip_blocks_below`` swaps them for a pass-through during the call.
4. **Start at the first changed position**: in a causal model, positions before the
   first one where the patched activation differs from the run's own are unchanged at
   every layer. The run feeds only the suffix, with the run's own keys and values of the
   prefix as a Hugging Face KV cache (``PrefixKV``). A cell whose patch changes nothing
   (e.g. a position before the clean and corrupted prompts first differ) is not run: its
   value is the unpatched run's.

``skipping_works`` and ``PrefixKV.works`` (through ``mechsteer.kv_cache``) check on one prompt that (3) and (4) leave the
logits unchanged on this model; if not, the engine falls back (warning), same numbers,
slower. With the default metric only the last position's logits are computed
(``logits_to_keep=1``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechsteer import kv_cache
from mechsteer.sites import hook_name, hooked

# Memory one patched forward may use when batch_size is not given (CPU; on CUDA a quarter
# of the free memory). On CPU, rows beyond a few hundred tokens' worth gain little.
CPU_BUDGET_BYTES = 128 * 2**20


@dataclass(frozen=True)
class Grid:
    """The cells of one layer: the position and head each patched run replaces.

    ``pos`` / ``head`` are ``(n_cells,)`` index tensors, or None for "all of them".
    ``shape`` is the cell axes' shape in the result (``()`` for a single cell).
    """

    pos: Tensor | None
    head: Tensor | None
    shape: tuple[int, ...]

    @property
    def n_cells(self) -> int:
        return math.prod(self.shape)

    def first_changed(self, source: Tensor, base: Tensor) -> Tensor:
        """``(n_cells,)``: the first position where a cell's patch changes the activation for
        some prompt; ``n_pos`` where it changes nothing."""
        n_pos = source.shape[1]
        neq = (source != base).flatten(3) if source.ndim > 3 else (source != base)[..., None, :]  # (B, T, H|1, d)
        changed = neq.any(-1).any(0)  # (T, H|1)
        if self.pos is not None:  # one position per cell: it alone can change
            pos = self.pos.to(changed.device)
            at = changed.any(1)[pos] if self.head is None else changed[pos, self.head.to(changed.device)]
            return torch.where(at, pos, n_pos)
        per = changed if self.head is not None else changed.any(1, keepdim=True)  # (T, H|1)
        first = torch.where(per.any(0), per.float().argmax(0), n_pos)  # argmax: first True
        return first if self.head is not None else first.reshape(1)


def make_grid(site: str, per_position: bool, n_pos: int, n_heads: int) -> Grid:
    """Cells for ``site``: positions, heads, or heads x positions (head-major)."""
    if site == "z" and per_position:  # (head, pos) cells, pos varies fastest
        return Grid(torch.arange(n_pos).repeat(n_heads), torch.arange(n_heads).repeat_interleave(n_pos), (n_heads, n_pos))
    if site == "z":
        return Grid(None, torch.arange(n_heads), (n_heads,))
    if per_position:
        return Grid(torch.arange(n_pos), None, (n_pos,))
    return Grid(None, None, ())


def cache_run(model, tokens: Tensor, names: list[str], **forward_kwargs):
    """One forward of ``tokens`` storing the activations at ``names`` (and only those)."""
    store: dict[str, Tensor] = {}

    def saver(name: str):
        def fn(x, hook):
            store[name] = x.detach()  # close over the registered name, not hook.name

        return fn

    with hooked(model, [(n, saver(n)) for n in names]):
        out = model(tokens, **forward_kwargs)
    return out, store


# ---- (3) start at the patched layer ---------------------------------------------------
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
def skipping_works(model, resid: Float[Tensor, "batch pos d_model"], layer: int) -> tuple[str, int] | None:
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
        if skipped.shape == reference.shape and torch.allclose(skipped, reference, atol=1e-5, rtol=0):
            return fmt
    warnings.warn("activation_patching: skipping the blocks below the patched layer changed the logits "
                  "on this model; every patched run executes all blocks (same numbers, slower).", stacklevel=3)
    return None


# ---- (4) start at the first changed position -----------------------------------------
class PrefixKV:
    """The patched run's own keys and values, served as a KV cache for a prefix of it
    (built through ``mechsteer.kv_cache``, the one module that touches cache objects)."""

    def __init__(self, prefix: kv_cache.PrefixCache) -> None:
        self.prefix = prefix

    @classmethod
    def of(cls, past, n_prompts: int, n_pos: int) -> "PrefixKV | None":
        """A ``PrefixKV`` of the run's returned cache, or None with one warning naming why not."""
        prefix = kv_cache.PrefixCache.of(past, n_prompts, n_pos, who="activation_patching")
        return None if prefix is None else cls(prefix)

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
        if out.shape[1:] == logits[:1, start:].shape[1:] and torch.allclose(out, logits[:1, start:], atol=1e-4, rtol=0):
            return True
        warnings.warn("activation_patching: reusing the keys and values of unchanged positions changed the "
                      "logits on this model; every patched run recomputes all positions (same numbers, slower).",
                      stacklevel=3)
        return False


def batch_rows(model, n_pos: int, n_prompts: int, keep_logits: int, batch_size: int | None) -> int:
    """Rows (patched prompts) per forward: ``batch_size`` or a memory estimate, rounded
    down to whole cells (a multiple of ``n_prompts``, at least one cell)."""
    if batch_size is None:
        cfg = model.cfg
        d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
        per_token = 8 * cfg.d_model + 3 * d_mlp + 3 * cfg.n_heads * n_pos  # live floats in one block
        per_row = 4 * (n_pos * per_token + keep_logits * cfg.d_vocab)
        device = torch.device(cfg.device)
        budget = torch.cuda.mem_get_info(device)[0] // 4 if device.type == "cuda" else CPU_BUDGET_BYTES
        batch_size = budget // per_row
    elif batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of rows per forward, got {batch_size}.")
    return max(1, batch_size // n_prompts) * n_prompts


# A forward's fixed cost (Python and kernel launches per block) is about that of this many
# extra token rows per block: measured on SmolLM2 on 2 CPU cores (about 3 ms per block vs
# 0.1 ms per token and block; benchmarks/bench_fast_paths.py). GPUs have a larger fixed cost.
FORWARD_COST_ROWS = 32


def plan(first: Tensor, n_pos: int, n_prompts: int = 1, rows_per_forward: int | None = None) -> list[tuple[int, Tensor]]:
    """Group the cells that change something into runs, each from one start position.

    Cells are grouped by the first position their patch changes; a group also takes the
    cells of later starts while the positions this adds (``n_prompts`` rows each, as many
    positions as the starts differ) cost less than a forward pass of their own
    (``FORWARD_COST_ROWS``) and its rows fit one forward. Positions before a cell's own
    start are recomputed unpatched: the same numbers, fewer forwards (per-position grids
    otherwise run one small forward per position).
    """
    starts = [(int(s), (first == s).nonzero().squeeze(1)) for s in first.unique() if s < n_pos]
    out: list[tuple[int, Tensor]] = []
    for start, cells in starts:  # ascending starts
        if out:
            s0, group = out[-1]
            fits = rows_per_forward is None or (len(group) + len(cells)) * n_prompts <= rows_per_forward
            if fits and (start - s0) * n_prompts * len(cells) <= FORWARD_COST_ROWS:
                out[-1] = (s0, torch.cat([group, cells]))
                continue
        out.append((start, cells))
    return out


@torch.no_grad()
def sweep(
    model, *, site: str, grid: Grid, groups: dict[int, list[tuple[int, Tensor]]], base_resid: dict[int, Tensor],
    source: dict[int, Tensor], unpatched: Tensor, base_logits: Tensor | None, prefix: PrefixKV | None,
    evaluate: Callable[[Tensor], Tensor], n_prompts: int, rows_per_forward: int, skip_fmt: tuple[str, int] | None,
    forward_kwargs: dict, bar: tqdm,
) -> Tensor:
    """Patched metric values for every layer and cell: ``(n_layers, n_cells, ...)``.

    ``groups[l]``: (start position, cells) to run at layer l (others keep ``unpatched``);
    ``base_resid[l]``: the residual entering block l of the run being patched;
    ``source[l]``: the source run's activation at ``site``; ``base_logits``: that run's
    logits, prepended to a suffix run's when the metric needs every position. Call it
    inside ``kv_cache.bridged(model)`` when ``prefix`` is given.
    """
    B, out = n_prompts, []
    for layer in sorted(base_resid):
        name, resid = hook_name(site, layer), base_resid[layer]
        values = unpatched.expand(grid.n_cells, *unpatched.shape[1:]).clone()
        for start, cells_run in groups[layer]:
            src = source[layer][:, start:]  # positions from `start` on: the run's length
            for r0 in range(0, len(cells_run) * B, rows_per_forward):
                rows = torch.arange(r0, min(r0 + rows_per_forward, len(cells_run) * B), device=resid.device)
                cells, prompts = cells_run.to(rows.device)[rows // B], rows % B  # row r: prompt r % B, cell r // B
                index: list = [torch.arange(len(rows), device=rows.device)]  # (R,) rows of this forward
                index.append(slice(None) if grid.pos is None else grid.pos.to(rows.device)[cells] - start)
                if grid.head is not None:
                    index.append(grid.head.to(rows.device)[cells])

                def patch(act, hook, index=index, prompts=prompts, src=src):
                    # In place, as TransformerLens does: on the bridge hook_resid_mid is ln2's
                    # input hook and the skip connection holds the same tensor, so only an
                    # in-place write patches the residual stream (a copy reaches the MLP alone).
                    act[tuple(index)] = src[(prompts, *index[1:])]  # each row gets its own cell
                    return act

                kwargs = dict(forward_kwargs)
                if start > 0:
                    kwargs["past_key_values"] = prefix.cache(prompts, start, layer)
                with skip_blocks_below(model, layer, skip_fmt), hooked(model, [(name, patch)]):
                    logits = model(resid[prompts, start:], start_at_layer=layer, **kwargs)
                if base_logits is not None and start > 0:
                    logits = torch.cat([base_logits[prompts, :start], logits], dim=1)
                values[cells_run[r0 // B : r0 // B + len(rows) // B]] = evaluate(logits).to(values.dtype)
                bar.update(1)
        out.append(values)
    return torch.stack(out)
