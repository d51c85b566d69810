"""The engine behind ``activation_patching``: cache, batch the patched runs, skip layers.

Why mechsteer has its own engine instead of calling ``transformer_lens.patching``: TL runs
one full forward pass of the whole batch per cell (layer x head x position), so patching
every head of a 30-layer model by position costs thousands of forwards, each starting from
the embedding and unembedding every position. Three things make this engine faster while
giving the same numbers:

1. **Cache only what is needed.** One pass caches the source run's activations at the
   patched site (``names_filter``-style, through ``hooked``), one pass caches the residual
   entering every block of the run being patched. Nothing else is stored.
2. **Batch the patched runs.** For one layer, the rows of a forward are (cell, prompt)
   pairs: row ``r`` is prompt ``r % B`` with cell ``r // B`` patched. One hook patches, per
   row, that row's cell by index arithmetic on the batch axis. Rows are chunked so one
   forward fits a memory budget (``batch_rows``).
3. **Start at the patched layer.** A patch at layer l cannot change layers below l, so
   each patched run starts from the cached residual entering block l
   (``model(resid, start_at_layer=l)``). On the TransformerLens 4 bridge that call gives
   the right numbers but still *executes* blocks 0..l-1 and discards their output, so
   ``skip_blocks_below`` swaps those blocks for a pass-through for the duration of the
   call. ``skipping_works`` checks once per sweep that this leaves the logits unchanged;
   if not, the engine warns and runs the lower blocks (same numbers, slower).

With the default metric only the last position's logits are computed
(``logits_to_keep=1``, a Hugging Face forward argument), which skips most of the
unembedding.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechsteer.sites import hook_name, hooked

# Memory one patched forward may use when batch_size is not given (CPU; on CUDA a quarter
# of the free memory). Bigger chunks amortise per-forward overhead; past a few hundred
# rows the gain on CPU is small.
CPU_BUDGET_BYTES = 512 * 2**20


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
        return int(torch.tensor(self.shape).prod().item()) if self.shape else 1


def make_grid(site: str, per_position: bool, n_pos: int, n_heads: int) -> Grid:
    """Cells for ``site``: positions, heads, or heads x positions (head-major)."""
    if site == "z" and per_position:  # (head, pos) cells, pos varies fastest
        return Grid(torch.arange(n_pos).repeat(n_heads), torch.arange(n_heads).repeat_interleave(n_pos), (n_heads, n_pos))
    if site == "z":
        return Grid(None, torch.arange(n_heads), (n_heads,))
    if per_position:
        return Grid(torch.arange(n_pos), None, (n_pos,))
    return Grid(None, None, ())


def cache_run(model, tokens: Tensor, names: list[str], **forward_kwargs) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward of ``tokens`` storing the activations at ``names`` (and only those)."""
    store: dict[str, Tensor] = {}

    def saver(name: str):
        def fn(x, hook):
            store[name] = x.detach()  # close over the registered name, not hook.name

        return fn

    with hooked(model, [(n, saver(n)) for n in names]):
        logits = model(tokens, **forward_kwargs)
    return logits, store


def _passthrough(fmt: tuple[str, int]) -> Callable:
    """A block forward that returns its input residual in the block's own output format."""

    def forward(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden if fmt[0] == "tensor" else (hidden,) + (None,) * (fmt[1] - 1)

    return forward


@contextlib.contextmanager
def skip_blocks_below(model, layer: int, fmt: tuple[str, int] | None) -> Iterator[None]:
    """Within the block, blocks ``0..layer-1`` return their input unchanged (restored on exit).

    For runs with ``start_at_layer=layer`` only: block ``layer`` replaces its input with the
    caller's residual, so what the skipped blocks return is discarded anyway.
    """
    if fmt is None or layer == 0:
        yield
        return
    blocks = list(model.blocks)[:layer]
    saved = [b.__dict__.get("forward") for b in blocks]
    try:
        for b in blocks:
            b.forward = _passthrough(fmt)  # instance attribute shadows the class method
        yield
    finally:
        for b, old in zip(blocks, saved):
            if old is None:
                b.__dict__.pop("forward", None)
            else:
                b.forward = old


@torch.no_grad()
def skipping_works(model, resid: Float[Tensor, "batch pos d_model"], layer: int) -> tuple[str, int] | None:
    """The blocks' output format if skipping the blocks below ``layer`` leaves the logits
    of ``model(resid, start_at_layer=layer)`` unchanged, else None (with a warning)."""
    seen: list = []
    handle = model.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(out))
    try:  # a plain torch hook that only reads the output's structure, never the values
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
    warnings.warn(
        "activation_patching: skipping the blocks below the patched layer changed the logits on "
        "this model, so every patched run executes all blocks (same numbers, slower).",
        stacklevel=3,
    )
    return None


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


@torch.no_grad()
def sweep(
    model,
    *,
    site: str,
    grid: Grid,
    base_resid: dict[int, Tensor],
    source: dict[int, Tensor],
    evaluate: Callable[[Tensor], Tensor],
    n_prompts: int,
    rows_per_forward: int,
    skip_fmt: tuple[str, int] | None,
    forward_kwargs: dict,
    bar: tqdm,
) -> Tensor:
    """Patched metric values for every layer and cell: ``(n_layers, n_cells, ...)``.

    ``base_resid[l]`` is the residual entering block l of the run being patched,
    ``source[l]`` the source run's activation at ``site``; ``evaluate`` maps the logits of
    whole cells (``(k * n_prompts, ...)``) to ``(k, ...)`` values.
    """
    B, n_cells = n_prompts, grid.n_cells
    out = []
    for layer in sorted(base_resid):
        name, src, start = hook_name(site, layer), source[layer], base_resid[layer]
        values = []
        for r0 in range(0, n_cells * B, rows_per_forward):
            rows = torch.arange(r0, min(r0 + rows_per_forward, n_cells * B), device=start.device)
            cells, prompts = rows // B, rows % B  # row r = prompt r % B with cell r // B patched
            index: list = [slice(None)]  # rows axis of the patched run, filled in the hook
            index.append(slice(None) if grid.pos is None else grid.pos.to(rows.device)[cells])
            if grid.head is not None:
                index.append(grid.head.to(rows.device)[cells])

            def patch(act, hook, index=index, prompts=prompts, src=src):
                act = act.clone()
                act[tuple(index)] = src[(prompts, *index[1:])]  # each row gets its own cell
                return act

            with skip_blocks_below(model, layer, skip_fmt), hooked(model, [(name, patch)]):
                logits = model(start[prompts], start_at_layer=layer, **forward_kwargs)
            values.append(evaluate(logits))
            bar.update(1)
        out.append(torch.cat(values))
    return torch.stack(out)
