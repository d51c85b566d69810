"""The engine behind ``activation_patching``: cache once, batch the patched runs, and
recompute only the layers and positions a patch can change.

Why mechsteer has its own engine instead of calling ``transformer_lens.patching``: TL runs
one full forward pass of the whole batch per cell (layer x head x position), each from the
embedding to the unembedding of every position, so patching every head of a 30-layer
model by position costs thousands of full forwards. This engine gives the same numbers
(to float precision; the tests compare) with far less work:

1. **Cache only what is needed**: the source run's activations at the patched site, and
   the residual entering every block, the site's values and the KV cache of the run being
   patched (``runs.cache_at``; nothing else is stored).
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

``runs.skipping_works`` and ``runs.PrefixKV.works`` (through ``mechsteer.kv_cache``) check
on one prompt that (3) and (4) leave the logits unchanged on this model; if not, the
engine falls back (warning), same numbers, slower. The run layer (``mechsteer.runs``)
holds caching, block skipping, prefix reuse and batching; this module holds what is
patching's own: the grid of cells, the plan of runs and the sweep. With the default metric only the last position's logits are computed
(``logits_to_keep=1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechsteer.runs import PrefixKV, skip_blocks_below
from mechsteer.sites import hook_name, hooked


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

    def first_changed(self, source: Tensor, base: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(n_cells,)``: the first position where a cell's patch changes the activation for
        some prompt; ``n_pos`` where it changes nothing. ``mask`` ``(B, T)``: the prompts'
        real tokens (a change at a pad, after a prompt's end, changes nothing it reads)."""
        n_pos = source.shape[1]
        neq = (source != base).flatten(3) if source.ndim > 3 else (source != base)[..., None, :]  # (B, T, H|1, d)
        neq = neq.any(-1)  # (B, T, H|1)
        if mask is not None:
            neq = neq & mask.to(neq.device)[:, :, None]
        changed = neq.any(0)  # (T, H|1)
        if self.pos is not None:  # one position per cell: it alone can change
            pos = self.pos.to(changed.device)
            at = changed.any(1)[pos] if self.head is None else changed[pos, self.head.to(changed.device)]
            return torch.where(at, pos, n_pos)
        per = changed if self.head is not None else changed.any(1, keepdim=True)  # (T, H|1)
        first = torch.where(per.any(0), per.float().argmax(0), n_pos)  # argmax: first True
        return first if self.head is not None else first.reshape(1)


def make_grid(site: str, per_position: bool, n_pos: int, n_heads: int, device: torch.device | str = "cpu") -> Grid:
    """Cells for ``site``: positions, heads, or heads x positions (head-major), as index
    tensors on ``device`` (the model's: the sweep indexes activations with them)."""
    arange = lambda n: torch.arange(n, device=device)  # noqa: E731
    if site == "z" and per_position:  # (head, pos) cells, pos varies fastest
        return Grid(arange(n_pos).repeat(n_heads), arange(n_heads).repeat_interleave(n_pos), (n_heads, n_pos))
    if site == "z":
        return Grid(None, arange(n_heads), (n_heads,))
    if per_position:
        return Grid(arange(n_pos), None, (n_pos,))
    return Grid(None, None, ())


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
    forward_kwargs: dict, bar: tqdm, last: Tensor | None = None,
) -> Tensor:
    """Patched metric values for every layer and cell: ``(n_layers, n_cells, ...)``.

    ``groups[l]``: (start position, cells) to run at layer l (others keep ``unpatched``);
    ``base_resid[l]``: the residual entering block l of the run being patched;
    ``source[l]``: the source run's activation at ``site``; ``base_logits``: that run's
    logits, prepended to a suffix run's when the metric needs every position. Call it
    inside ``kv_cache.bridged(model)`` when ``prefix`` is given.

    ``last`` ``(B,)``: each prompt's last token when prompts are right-padded and the
    metric is the per-prompt default: a run keeps the logits from its earliest answer
    position on (``logits_to_keep``), ``evaluate`` gets each row's answer logits
    ``(R, 1, vocab)``, and a row whose answer lies before the run's start (a patch at a
    pad after its prompt's end) keeps its unpatched value.
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
                if last is not None:  # right-padded prompts: read each row at its own last token
                    rel = last.to(rows.device)[prompts] - start  # (R,) answer column in this run
                    live = rel >= 0
                    if not bool(live.any()):  # every patched position lies after these prompts' ends
                        bar.update(1)
                        continue
                    kwargs["logits_to_keep"] = keep = resid.shape[1] - start - int(rel[live].min())
                if start > 0:
                    kwargs["past_key_values"] = prefix.cache(prompts, start, layer)
                with skip_blocks_below(model, layer, skip_fmt), hooked(model, [(name, patch)]):
                    logits = model(resid[prompts, start:], start_at_layer=layer, **kwargs)
                if base_logits is not None and start > 0:
                    logits = torch.cat([base_logits[prompts, :start], logits], dim=1)
                if last is not None:
                    col = (rel - (resid.shape[1] - start - keep)).clamp(min=0)
                    logits = logits[torch.arange(len(rows), device=logits.device), col.to(logits.device)][:, None]
                value = evaluate(logits).to(values.dtype)  # (k, B)
                if last is not None and not bool(live.all()):
                    value = torch.where(live.to(value.device).view_as(value), value, unpatched.to(value).expand_as(value))
                values[cells_run[r0 // B : r0 // B + len(rows) // B].to(values.device)] = value.to(values.device)
                bar.update(1)
        out.append(values)
    return torch.stack(out)
