"""Country-capital conflict (CCC; Stoehr et al., Table 1).

The context asserts a wrong capital, the question asks for the real one:

    "The capital of France is Rome. Q: What is the capital of France? A:" -> " Paris" / " Rome"

``correct`` is the real capital, ``wrong`` the in-context one. The corrupted prompt states
the true capital, so it has the same token length and an uncontested answer.
"""

from __future__ import annotations

import random

from mechsteer.tasks.base import Candidate, ContrastiveDataset, build_dataset
from mechsteer.tasks.data import CCC_EXCLUDE, CCC_TEMPLATE, COUNTRY_CAPITALS


def ccc_candidates(seed: int = 0, per_country: int = 3) -> list[Candidate]:
    """All CCC candidates: each country paired with ``per_country`` wrong capitals."""
    rng = random.Random(seed)
    pairs = [(c, k) for c, k in COUNTRY_CAPITALS if k not in CCC_EXCLUDE and c != k]
    capitals = [k for _, k in pairs]
    out = []
    for country, capital in pairs:
        others = [k for k in capitals if k != capital]
        for wrong in rng.sample(others, per_country):
            out.append(
                Candidate(
                    prompt=CCC_TEMPLATE.format(country=country, capital=wrong),
                    corrupted=CCC_TEMPLATE.format(country=country, capital=capital),
                    correct=" " + capital,
                    wrong=" " + wrong,
                    meta={"country": country, "capital": capital, "in_context": wrong},
                )
            )
    return out


def ccc(model, n: int | None = 64, seed: int = 0) -> ContrastiveDataset:
    """Build the CCC dataset for ``model``'s tokenizer (``n`` items, or all valid if None).

    >>> from mechsteer.tiny import tiny_model
    >>> ds = ccc(tiny_model("gpt2"), n=8)
    >>> len(ds), ds.tokens.shape[0] == len(ds.correct)
    (8, True)
    """
    return build_dataset("ccc", model, ccc_candidates(seed), n=n, seed=seed)
