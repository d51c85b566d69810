"""Function-vector tasks (seed papers 000 and 004): instruction prompts with intensional frames.

SKELETON written by the owner to fix the interface; the data, builders, corruption and
filter are to be filled in (see the task brief). Keep ``FVPrompts``' fields and methods.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor


@dataclass(frozen=True)
class FVPrompts:
    """Prompts of one task in one style, unpadded (prompts may differ in token length).

    ``tokens[n]`` is prompt n's 1-D token ids (BOS included when the model prepends one);
    the prediction is read at its LAST position. ``answers[n]`` is the first token of
    " {output}". ``frames[n]`` are the token positions of the instruction's intensional
    frame in prompt n (empty when the prompt has no instruction, e.g. zero-shot).
    """

    task: str
    style: str  # "instruction" | "chat" | "icl" | "zero_shot" (+ "/corrupted" for corrupted prompts)
    texts: list[str]
    tokens: list[Int[Tensor, " pos"]]
    answers: Int[Tensor, " batch"]
    frames: list[list[int]]
    instructions: list[int]  # index of the instruction phrasing per prompt (-1: none)
    inputs: list[str]
    outputs: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        """Token length of each prompt."""
        return torch.tensor([len(t) for t in self.tokens], dtype=torch.long)

    def subset(self, index: Sequence[int]) -> "FVPrompts":
        """The prompts at ``index`` (in that order)."""
        idx = [int(i) for i in index]
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return FVPrompts(
            task=self.task,
            style=self.style,
            texts=pick(self.texts),
            tokens=pick(self.tokens),
            answers=self.answers[idx] if idx else self.answers[:0],
            frames=pick(self.frames),
            instructions=pick(self.instructions),
            inputs=pick(self.inputs),
            outputs=pick(self.outputs),
            meta=dict(self.meta),
        )

    def batches(self, batch_size: int = 32) -> Iterator[tuple[list[int], Int[Tensor, "batch pos"]]]:
        """Equal-length groups of at most ``batch_size`` prompts: yields (indices, stacked tokens).

        Every batch has one token length, so position -1 is every prompt's last token.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        by_len: dict[int, list[int]] = {}
        for i, t in enumerate(self.tokens):
            by_len.setdefault(len(t), []).append(i)
        for n in sorted(by_len):
            idx = by_len[n]
            for s in range(0, len(idx), batch_size):
                chunk = idx[s : s + batch_size]
                yield chunk, torch.stack([self.tokens[i] for i in chunk])
