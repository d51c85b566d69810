"""Position axes of a dataset whose prompts may differ in token length.

Padding. Mixed-length prompts are **right-padded** into one ``(batch, pos)`` tensor:
prompt b's real tokens sit at 0..L_b-1 and pads after them. Why right and not left:
with causal attention a token only sees tokens before it, so pads placed after a prompt
can never change anything at that prompt's real positions, whatever the model does with
pads (masked or not), and positional ids stay 0..L_b-1 without being passed in (rotary
and learned position embeddings alike). Left padding would need an attention mask *and*
shifted position ids through every hooked run. The one thing right padding asks of every
method is to read the answer at each prompt's own last token, ``ds.last`` (= L_b - 1),
and to leave pad positions out of sums and means (``ds.mask``).

Position axes. A per-position result computed per prompt in token coordinates
``(batch, ..., pos)`` is put on one axis shared by all prompts with ``reduce_positions``:

- ``"tokens"``: token index p (only when every prompt has the same length; labels
  ``"p:token"`` of the first prompt, the historical axis);
- ``"named"``: the dataset's named positions (IOI's ``IO, S1, S2``; a user's
  ``positions``), then ``"end"`` (each prompt's last token);
- ``"end"``: end-relative positions ``end-k, ..., end-1, end`` (k = longest length - 1).

``"auto"`` (the default) takes ``"tokens"`` for equal lengths, else ``"named"`` when the
dataset names positions, else ``"end"``. Each axis entry is averaged over the prompts that
have it (a short prompt has no ``end-30``), so prompts of different lengths average
correctly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

MODES = ("auto", "tokens", "named", "end")


@dataclass(frozen=True)
class PositionAxis:
    """``labels[j]`` names axis entry j; ``index[b, j]`` is prompt b's token index for it
    (-1 where prompt b has no such position)."""

    mode: str
    labels: list[str]
    index: Int[Tensor, "batch n"]

    @property
    def present(self) -> Tensor:
        """``(batch, n)`` bool: which prompts have each entry."""
        return self.index >= 0


def position_axis(ds, mode: str = "auto") -> PositionAxis:
    """The position axis of ``ds`` in ``mode`` (see the module docstring).

    >>> from types import SimpleNamespace as NS
    >>> ds = NS(lengths=torch.tensor([3, 2]), positions=[{"x": 1}, {"x": 0}], str_tokens=[["a", "b", "c"], ["d", "e"]])
    >>> ax = position_axis(ds)
    >>> ax.mode, ax.labels, ax.index.tolist()
    ('named', ['x', 'end'], [[1, 2], [0, 1]])
    >>> position_axis(ds, "end").index.tolist()
    [[0, 1, 2], [-1, 0, 1]]
    """
    if mode not in MODES:
        raise ValueError(f"positions must be one of {MODES}, got {mode!r}.")
    lengths = ds.lengths.cpu().long()
    B, L = len(lengths), int(lengths.max())
    equal = bool((lengths == L).all())
    named = [dict(p) for p in (ds.positions or [{} for _ in range(B)])]
    if mode == "auto":
        mode = "tokens" if equal else ("named" if any(named) else "end")
    if mode == "tokens":
        if not equal:
            raise ValueError(
                f"positions='tokens' needs prompts of one token length; these have lengths {sorted(set(lengths.tolist()))}. "
                "Use positions='named' (the dataset's named positions) or 'end' (end-relative)."
            )
        labels = [f"{i}:{t}" for i, t in enumerate(ds.str_tokens[0])]
        return PositionAxis("tokens", labels, torch.arange(L).expand(B, L).clone())
    if mode == "end":
        offsets = torch.arange(L - 1, -1, -1)  # end-(L-1) .. end-0
        index = (lengths - 1)[:, None] - offsets[None, :]
        index[index < 0] = -1
        labels = [f"end-{k}" if k else "end" for k in offsets.tolist()]
        return PositionAxis("end", labels, index)
    names: list[str] = []
    for p in named:  # order of first appearance, ranked by token index within a prompt
        for name, _ in sorted(p.items(), key=lambda kv: kv[1]):
            if name not in names and name != "end":
                names.append(name)
    if not names:
        raise ValueError("positions='named' but this dataset names no positions; give records a 'positions' map, "
                         "or use positions='end' (end-relative).")
    index = torch.full((B, len(names) + 1), -1, dtype=torch.long)
    for b, p in enumerate(named):
        for j, name in enumerate(names):
            if name in p:
                index[b, j] = int(p[name])
        index[b, -1] = int(lengths[b]) - 1
    return PositionAxis("named", names + ["end"], index)


def reduce_positions(
    x: Float[Tensor, "batch *rest"], axis: PositionAxis, dim: int = -1, *, per_prompt: bool = False
) -> Tensor:
    """Put per-prompt values at token positions (``x``: batch first, token positions at
    ``dim``) on ``axis``: the mean over the prompts that have each entry, with the batch
    axis removed; ``per_prompt=True`` keeps the batch axis (absent entries are 0).

    >>> ax = PositionAxis("end", ["end-1", "end"], torch.tensor([[0, 1], [-1, 0]]))
    >>> reduce_positions(torch.tensor([[1.0, 2.0], [4.0, 9.0]]), ax).tolist()
    [1.0, 3.0]
    """
    dim = dim % x.ndim
    if dim == 0:
        raise ValueError("dim must be the token-position axis, not the batch axis (0).")
    B, n = axis.index.shape
    if x.shape[0] != B:
        raise ValueError(f"x has {x.shape[0]} prompts, the position axis {B}.")
    idx = axis.index.to(x.device).clamp(min=0)  # (B, n)
    shape = [B] + [1] * (x.ndim - 1)
    shape[dim] = n
    gathered = x.gather(dim, idx.reshape(shape).expand(*[s if i != dim else n for i, s in enumerate(x.shape)]))
    present = axis.present.to(x.device).reshape(shape).to(x.dtype)
    gathered = gathered * present
    if per_prompt:
        return gathered
    return gathered.sum(0) / present.sum(0).clamp(min=1)
