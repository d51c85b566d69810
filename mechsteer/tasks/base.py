"""Contrastive datasets: (prompt, correct answer, wrong answer) + corrupted prompt.

A dataset is built *for a model's tokenizer*: items are tokenised, those that fail a check
are dropped and counted by reason. ``ContrastiveDataset`` (``mechsteer.tasks.dataset``)
holds the result; ``mechsteer.tasks.from_records`` builds one from your own records, and
the built-in tasks (``ccc``, ``ioi``) are records too. ``build_dataset`` is the historical
entry point on ``Candidate`` items (single-token answers), kept as a thin wrapper.
Prompts may differ in token length: they are right-padded (``mechsteer.tasks.positions``
says why) and every method reads the answer at each prompt's own last token ``ds.last``.
Generation is deterministic given a seed.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from mechsteer.tasks.dataset import ContrastiveDataset
from mechsteer.tasks.records import from_records, pad_token_id, single_token

__all__ = ["Candidate", "ContrastiveDataset", "build_dataset", "candidate_records", "fill_spans", "pad_token_id", "single_token",
           "template_indices"]


@dataclass(frozen=True)
class Candidate:
    """One generated item before tokenisation."""

    prompt: str
    corrupted: str
    correct: str  # answer text with the leading space the model uses, e.g. " Paris"
    wrong: str
    meta: dict[str, Any] = field(default_factory=dict)
    # name -> [start, end) character span in ``prompt`` (e.g. IOI's "IO", "S1", "S2")
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)


def candidate_records(candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
    """``candidates`` as records for ``from_records`` (``meta`` keys become extra columns)."""
    return [
        {**c.meta, "prompt": c.prompt, "corrupted": c.corrupted, "correct": c.correct, "wrong": c.wrong,
         **({"positions": dict(c.positions)} if c.positions else {})}
        for c in candidates
    ]


def fill_spans(template: str, values: dict[str, str]) -> tuple[str, list[tuple[str, int, int]]]:
    """``template`` filled with ``values`` and the ``(slot, start, end)`` character span of
    every slot it fills, in order (a slot used twice appears twice)."""
    text, spans = "", []
    for part in re.split(r"(\{\w+\})", template):
        if part.startswith("{") and part.endswith("}") and part[1:-1] in values:
            spans.append((part[1:-1], len(text), len(text) + len(values[part[1:-1]])))
            text += values[part[1:-1]]
        else:
            text += part
    return text, spans


def template_indices(task: str, template, n_templates: int) -> list[int]:
    """``template`` (an index, a list of indices or None for all) as a non-empty list of
    indices in ``0..n_templates-1``; TypeError/ValueError naming the bad entry otherwise."""
    if template is None:
        return list(range(n_templates))
    if isinstance(template, (str, bytes)) or not isinstance(template, (numbers.Integral, Sequence, range)):
        raise TypeError(f"template must be an int, a list of ints or None, got {type(template).__name__} ({template!r}).")
    chosen = [template] if isinstance(template, numbers.Integral) else list(template)
    if not chosen:
        raise ValueError("template is an empty list; give an index, a list of indices or None (all templates).")
    for t in chosen:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"{task.upper()} template index must be an int, got {t!r} ({type(t).__name__}).")
        if not 0 <= t < n_templates:
            raise ValueError(f"{task.upper()} template index {t!r} out of range 0..{n_templates - 1}.")
    return [int(t) for t in chosen]


def build_dataset(
    name: str,
    model,
    candidates: Sequence[Candidate],
    *,
    n: int | None,
    seed: int,
    min_items: int = 2,
    same_length: bool = True,
    single_token_answers: bool = True,
) -> ContrastiveDataset:
    """Tokenise ``candidates`` for ``model``, drop invalid ones, shuffle by ``seed`` and keep
    ``n``: ``from_records(model, candidate_records(candidates), ...)`` without warnings.

    With ``same_length`` keep the largest group of one token length, else right-pad prompts
    of any length; with ``single_token_answers`` drop answers of several tokens. Drop
    reasons: ``duplicate``, ``answer_not_single_token``, ``answers_equal``,
    ``answer_is_prefix``, ``corrupted_length_differs``, ``length_not_modal``. Raises
    ValueError when fewer than ``min_items`` remain, naming the counts.

    >>> from mechsteer.tiny import tiny_model
    >>> ds = build_dataset("toy", tiny_model("gpt2"), [Candidate("a b", "a c", " Paris", " Rome")], n=None, seed=0,
    ...                    min_items=1)
    >>> len(ds), ds.correct_answers
    (1, [' Paris'])
    """
    return from_records(model, candidate_records(candidates), name=name, n=n, seed=seed, min_items=min_items,
                        same_length=same_length, single_token=single_token_answers, warn=False)
