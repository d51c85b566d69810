"""Indirect object identification (IOI; Wang et al. 2022).

    "When Anne met with Tom, Tom gave the book to" -> " Anne" (indirect object) / " Tom"

The corrupted prompt swaps the second mention of the subject for the indirect object
("..., Anne gave the book to"), which moves the answer to " Tom": it has the same token
length and the opposite preference, so patching measures what carries the names.

Named positions (``ds.positions``, read at each name's last token): ``IO`` (the indirect
object's first mention), ``S1`` (the subject's first mention), ``S2`` (the subject's second
mention, the token the corruption swaps); ``end`` (the last token) is implied.
"""

from __future__ import annotations

import random

from mechsteer._validate import nonneg_int, positive_int
from mechsteer.tasks.base import Candidate, ContrastiveDataset, candidate_records, fill_spans, template_indices
from mechsteer.tasks.records import from_records
from mechsteer.tasks.data import IOI_TEMPLATES, NAMES, OBJECTS, PLACES


def _fill(template: str, a: str, b: str, second: str, obj: str, place: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """Fill ``template`` with {A}, {B}; the *second* {B} becomes ``second``. Returns the text
    and the spans of IO (first {A}), S1 (first {B}) and S2 (second {B})."""
    head, sep, tail = template.rpartition("{B}")
    template = head + "{S2}" + tail if sep else template
    text, spans = fill_spans(template, {"A": a, "B": b, "S2": second, "object": obj, "place": place})
    firsts: dict[str, tuple[int, int]] = {}
    for slot, lo, hi in spans:
        firsts.setdefault({"A": "IO", "B": "S1"}.get(slot, slot), (lo, hi))
    return text, {k: v for k, v in firsts.items() if k in ("IO", "S1", "S2")}


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
            prompt, spans = _fill(template, a, b, b, obj, place)
            out.append(
                Candidate(
                    prompt=prompt,
                    corrupted=_fill(template, a, b, a, obj, place)[0],
                    correct=" " + a,
                    wrong=" " + b,
                    meta={"template": t, "io": a, "subject": b},
                    positions=spans,
                )
            )
    return out


def ioi(
    model, n: int | None = 64, seed: int = 0, template: int | list[int] | None = None, same_length: bool = True
) -> ContrastiveDataset:
    """Build the IOI dataset for ``model``'s tokenizer, through ``from_records``, shuffled by ``seed``.

    ``template`` picks one template index (or a list); by default all templates are
    generated. ``same_length=True`` keeps single-token names and the largest group of
    equal-length prompts (the historical dataset); ``same_length=False`` keeps every valid
    item: prompts of mixed lengths (right-padded) and multi-token names.

    >>> from mechsteer.tiny import tiny_model
    >>> ds = ioi(tiny_model("llama"), n=8, template=1)
    >>> ds.prompts[0].startswith("When"), len(ds)
    (True, 8)
    """
    n, seed = positive_int("n", n, allow_none=True), nonneg_int("seed", seed)
    templates = template_indices("ioi", template, len(IOI_TEMPLATES))
    records = candidate_records(ioi_candidates(seed, templates=templates))
    return from_records(model, records, name="ioi", n=n, seed=seed, min_items=2, same_length=same_length,
                        single_token=same_length, warn=False)
