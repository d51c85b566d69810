"""Indirect object identification (IOI; Wang et al. 2022).

    "When Anne met with Tom, Tom gave the book to" -> " Anne" (indirect object) / " Tom"

The corrupted prompt swaps the second mention of the subject for the indirect object
("..., Anne gave the book to"), which moves the answer to " Tom": it has the same token
length and the opposite preference, so patching measures what carries the names.
"""

from __future__ import annotations

import random

from mechsteer._validate import nonneg_int, positive_int
from mechsteer.tasks.base import Candidate, ContrastiveDataset, build_dataset, template_indices
from mechsteer.tasks.data import IOI_TEMPLATES, NAMES, OBJECTS, PLACES


def _fill(template: str, a: str, b: str, second: str, obj: str, place: str) -> str:
    """Fill ``template`` with {A}, {B}; the *second* {B} becomes ``second``."""
    head, sep, tail = template.rpartition("{B}")
    return (head.format(A=a, B=b, object=obj, place=place) + second + tail.format(object=obj, place=place)) if sep else template


def ioi_candidates(seed: int = 0, n_per_template: int = 200, templates: list[int] | None = None) -> list[Candidate]:
    """IOI candidates from the chosen templates (indices into ``IOI_TEMPLATES``)."""
    rng = random.Random(nonneg_int("seed", seed))
    n_per_template = positive_int("n_per_template", n_per_template)
    out = []
    for t in template_indices("ioi", templates, len(IOI_TEMPLATES)):
        template = IOI_TEMPLATES[t]
        for _ in range(n_per_template):
            a, b = rng.sample(NAMES, 2)
            obj, place = rng.choice(OBJECTS), rng.choice(PLACES)
            out.append(
                Candidate(
                    prompt=_fill(template, a, b, b, obj, place),
                    corrupted=_fill(template, a, b, a, obj, place),
                    correct=" " + a,
                    wrong=" " + b,
                    meta={"template": t, "io": a, "subject": b},
                )
            )
    return out


def ioi(model, n: int | None = 64, seed: int = 0, template: int | list[int] | None = None) -> ContrastiveDataset:
    """Build the IOI dataset for ``model``'s tokenizer.

    ``template`` picks one template index (or a list); by default all templates are
    generated and the largest group of equal-length prompts is kept.

    >>> from mechsteer.tiny import tiny_model
    >>> ds = ioi(tiny_model("llama"), n=8, template=1)
    >>> ds.prompts[0].startswith("When"), len(ds)
    (True, 8)
    """
    n, seed = positive_int("n", n, allow_none=True), nonneg_int("seed", seed)
    templates = template_indices("ioi", template, len(IOI_TEMPLATES))
    return build_dataset("ioi", model, ioi_candidates(seed, templates=templates), n=n, seed=seed)
