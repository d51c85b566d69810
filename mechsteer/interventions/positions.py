"""Where an intervention edits: token positions, slots of a position axis, and binding.

An intervention's ``positions`` are ``"all"``, ``"last"`` or a list of token indices. On
prompts of one length (no padding) a forward edits those token columns of the batch,
exactly as always. Datasets may hold prompts of different lengths, right-padded
(``mechsteer.tasks.positions``): there token column p is a different word in every prompt,
so a parameter tied to p would mean nothing. Two things make interventions run on such
data.

Slots. A position-bound intervention (ActivScalar, SteerVec) can hold one parameter per
*slot* of a position axis instead of per token column: ``slots`` are the axis labels,
end-relative ``["end-20", ..., "end-1", "end"]`` or named ``["IO", "S1", "S2", "end"]``
(``ds.position_axis(mode).labels``). ``Intervention.for_dataset(model, ds)`` picks them
like the other methods' per-position results do (``"auto"``: token columns for equal
lengths, exactly as before; named positions if the dataset names them; else end-relative).

Binding. At forward time each prompt must apply each slot's parameter at its own token
index. That index is a ``(batch, n_sel)`` tensor ``where`` (-1 where a prompt has no such
slot, which is then left untouched): ``iv.token_index(ds)`` computes it for a dataset
(slots matched to the dataset's axis *by label*, so an intervention trained on prompts of
up to 21 tokens runs on a test set of up to 25: slots it lacks are absent), and
``with iv.bind(where):`` (or ``iv.apply(model, beta, where=where)``) hands the rows of the
batch about to run to the hooks. The training, evaluation, transfer and interpretation
loops bind each mini-batch's rows themselves; only a hand-written forward needs ``bind``.
``"last"`` binds to each prompt's own last token the same way, and DynScalar with
``positions="all"`` needs no binding (its scalar is a function of h; pads come after every
real token, so editing them changes nothing a real token sees). An unbound end-relative
intervention infers ``where`` from the forward's length (every prompt full width: a
single prompt, generation); a named one needs ``bind``.

Several slots at one token (a named position that is also the last token) add their edits.
"""

from __future__ import annotations

import numbers
import re

import torch
from jaxtyping import Float, Int
from torch import Tensor

AXES = ("auto", "tokens", "named", "end")
_END = re.compile(r"^end(-[0-9]+)?$")


def as_index(name: str, x) -> int:
    """``x`` as an int if it is an integer (a 0-d integer tensor too; bools and floats refused)."""
    if isinstance(x, Tensor) and x.ndim == 0 and not x.is_floating_point():
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must hold integers, got {x!r} ({type(x).__name__}).")
    return int(x)


def check_slots(slots) -> tuple[str, ...] | None:
    """``slots`` as a tuple of distinct non-empty labels (None stays None)."""
    if slots is None:
        return None
    if isinstance(slots, str) or not all(isinstance(s, str) and s for s in slots):
        raise TypeError(f"slots must be a list of position labels (e.g. ['end-1', 'end'] or ['IO', 'S2', 'end']), got {slots!r}.")
    slots = tuple(slots)
    if not slots or len(set(slots)) != len(slots):
        raise ValueError(f"slots {list(slots)!r} must be a non-empty list of distinct labels.")
    return slots


def slot_mode(slots: tuple[str, ...]) -> str:
    """``"end"`` when every slot is end-relative (``end``, ``end-k``), else ``"named"``."""
    return "end" if all(_END.match(s) for s in slots) else "named"


def end_offset(label: str) -> int:
    """k of ``"end-k"`` (0 for ``"end"``)."""
    return int(label[4:]) if label != "end" else 0


def check_positions(iv, positions, n_pos):
    """``positions`` ("all", "last" or distinct ints, wrapped modulo ``n_pos`` when given) for ``iv``."""
    name = type(iv).__name__
    if isinstance(positions, str):
        if positions not in ("all", "last"):
            raise ValueError(f"positions={positions!r}: use 'all', 'last' or a list of ints.")
        if positions == "all" and iv.position_bound and n_pos is None:
            raise ValueError(f"{name} with positions='all' needs n_pos (the prompt length) or slots.")
        return positions
    if isinstance(positions, numbers.Number) or isinstance(positions, Tensor) and positions.ndim == 0:
        raise TypeError(f"positions must be 'all', 'last' or a list of ints, got {positions!r}.")
    pos = tuple(as_index("positions", p) for p in positions)
    if not pos or len(set(pos)) != len(pos):
        raise ValueError(f"positions {positions!r} must be a non-empty list of distinct ints.")
    if iv.position_bound and n_pos is None:
        raise ValueError(f"{name} with a list of positions needs n_pos (the prompt length).")
    if n_pos is not None:
        bad = [p for p in pos if not -n_pos <= p < n_pos]
        if bad:
            raise ValueError(f"Positions {bad} are beyond prompts of n_pos={n_pos} tokens (0..{n_pos - 1}).")
        pos = tuple(p % n_pos for p in pos)
        if len(set(pos)) != len(pos):
            raise ValueError(f"positions {positions!r} name the same token twice for n_pos={n_pos}.")
    return pos


def column_index(iv, n: int, device) -> Tensor | None:
    """Token columns an unbound forward of ``n`` tokens edits (None: all of them)."""
    if iv.position_bound and iv.n_pos is not None and iv.slots is None and n != iv.n_pos:
        raise ValueError(
            f"{type(iv).__name__} was built for prompts of {iv.n_pos} tokens, got {n}: its parameters "
            "are tied to positions. Use prompts of that length, build it with slots "
            "(for_dataset(model, ds) binds end-relative or named positions), or DynScalar for any length."
        )
    if iv.positions == "all":
        return None
    pos = [n - 1] if iv.positions == "last" else list(iv.positions)
    bad = [p for p in pos if not -n <= p < n]
    if bad:
        raise ValueError(f"Positions {bad} are beyond this prompt of {n} tokens.")
    return torch.tensor([p % n for p in pos], device=device)


def end_index(slots: tuple[str, ...], lengths: Int[Tensor, " batch"]) -> Int[Tensor, "batch n"]:
    """``where`` of end-relative ``slots`` for prompts of ``lengths`` tokens (-1 if too short)."""
    k = torch.tensor([end_offset(s) for s in slots], device=lengths.device)
    w = (lengths.long() - 1)[:, None] - k[None, :]
    return w.masked_fill(w < 0, -1)


def token_index(iv, ds) -> Int[Tensor, "batch n_sel"] | None:
    """Per prompt of ``ds``, the token index of each of ``iv``'s selected positions (-1 where
    absent); None when an unbound forward is already exact (no pads, no slots)."""
    lengths = ds.lengths.cpu().long()
    if iv.slots is not None:
        mode = slot_mode(iv.slots)
        if mode == "end":
            return end_index(iv.slots, lengths)
        named = ds.positions or [{} for _ in range(len(lengths))]
        out = torch.full((len(lengths), len(iv.slots)), -1, dtype=torch.long)
        for i, s in enumerate(iv.slots):  # a slot a prompt does not name stays -1 (no edit there)
            if s == "end":
                out[:, i] = lengths - 1
            else:
                out[:, i] = torch.tensor([int(p.get(s, -1)) for p in named], dtype=torch.long)
        if bool((out < 0).all()):
            raise ValueError(f"None of this {type(iv).__name__}'s slots {list(iv.slots)} is a position of dataset "
                             f"{ds.name!r} (it names {sorted({k for p in named for k in p}) + ['end']}).")
        return out
    if not ds.is_padded:
        return None
    if iv.positions == "all":
        if iv.position_bound:
            raise ValueError(
                f"This {type(iv).__name__} holds one parameter per token column (n_pos={iv.n_pos}), but dataset "
                f"{ds.name!r} mixes prompt lengths {sorted(set(lengths.tolist()))}: column p is a different token "
                "in each prompt. Build it with for_dataset(model, ds) (end-relative or named slots)."
            )
        return None  # DynScalar on every token: pads come after the real tokens
    if iv.positions == "last":
        return (lengths - 1)[:, None]
    if iv.position_bound and iv.n_pos is not None and bool((lengths != iv.n_pos).any()):
        raise ValueError(
            f"This {type(iv).__name__} edits token positions {list(iv.positions)} of prompts of n_pos={iv.n_pos} "
            f"tokens; dataset {ds.name!r} has lengths {sorted(set(lengths.tolist()))}. Use slots (for_dataset)."
        )
    p = torch.tensor(iv.positions)
    w = torch.where(p[None, :] < 0, lengths[:, None] + p[None, :], p[None, :].expand(len(lengths), -1))
    return w.masked_fill((w < 0) | (w >= lengths[:, None]), -1)


def check_where(where, n_sel: int) -> Tensor | None:
    """``where`` as a ``(batch, n_sel)`` long tensor (None stays None)."""
    if where is None:
        return None
    if not isinstance(where, Tensor) or where.is_floating_point() or where.dtype == torch.bool:
        raise TypeError(f"where must be a (batch, {n_sel}) integer tensor of token indices, got {where!r}.")
    if where.ndim != 2 or where.shape[1] != n_sel:
        raise ValueError(f"where has shape {tuple(where.shape)}; expected (batch, {n_sel}): one token index per "
                         "prompt and selected position (-1 where absent). Compute it with iv.token_index(ds).")
    if int(where.min()) < -1:
        raise ValueError(f"where holds {int(where.min())}; token indices are >= 0, or -1 for an absent slot.")
    return where.long()


def where_for_forward(iv, bound: Tensor | None, x: Tensor) -> Tensor | None:
    """The ``where`` of a forward whose activation is ``x`` (batch, pos, ...): the bound rows,
    or inferred for end-relative slots on full-width prompts, or None (column path)."""
    B, T = x.shape[:2]
    if bound is not None:
        if bound.shape[0] != B:
            raise ValueError(f"{type(iv).__name__} is bound to {bound.shape[0]} prompts but the forward has {B}; "
                             "bind the rows of the batch that runs (where[idx]).")
        if int(bound.max()) >= T:
            raise ValueError(f"The bound token index {int(bound.max())} is beyond this forward's {T} tokens.")
        return bound.to(x.device)
    if iv.slots is None:
        return None
    if slot_mode(iv.slots) == "named":
        raise ValueError(f"This {type(iv).__name__} has named slots {list(iv.slots)}: bind each prompt's token "
                         "indices first, `with iv.bind(iv.token_index(ds)[idx]):` (training and evaluation do).")
    return end_index(iv.slots, torch.full((B,), T, device=x.device))


def steer_at(
    x: Float[Tensor, "batch pos *tail"], where: Int[Tensor, "batch n"], edit
) -> Float[Tensor, "batch pos *tail"]:
    """x with ``edit(h)`` applied at each prompt's tokens ``where`` (h: (batch, n, *tail), slot
    j's parameter at prompt b's token where[b, j]); absent slots (-1) leave x untouched.

    >>> x = torch.zeros(2, 3, 1)
    >>> steer_at(x, torch.tensor([[2, -1], [0, 1]]), lambda h: h + torch.tensor([1.0, 2.0])[:, None])[..., 0].tolist()
    [[0.0, 0.0, 1.0], [1.0, 2.0, 0.0]]
    """
    present = where >= 0  # (B, n)
    idx = where.clamp(min=0).view(*where.shape, *([1] * (x.ndim - 2))).expand(*where.shape, *x.shape[2:])
    h = x.gather(1, idx)  # (B, n, *tail)
    delta = (edit(h) - h) * present.view(*where.shape, *([1] * (x.ndim - 2))).to(x.dtype)
    return x + torch.zeros_like(x).scatter_add(1, idx, delta)


def for_dataset(cls, model, ds, sites, layers, positions, axis: str, **kwargs):
    """``cls`` built for ``ds``'s prompts: see ``Intervention.for_dataset``."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}.")
    if "n_pos" in kwargs or "slots" in kwargs:
        raise TypeError("for_dataset sets n_pos and slots from ds; call for_model to set them by hand.")
    if positions == "all" and cls.position_bound:
        ax = ds.position_axis(axis)
        if ax.mode == "tokens":
            return cls.for_model(model, sites, layers, "all", n_pos=ds.n_pos, **kwargs)  # as always
        return cls.for_model(model, sites, layers, "all", slots=ax.labels, **kwargs)
    n_pos = None if ds.is_padded and (positions == "last" or not cls.position_bound) else ds.n_pos
    return cls.for_model(model, sites, layers, positions, n_pos=n_pos, **kwargs)
