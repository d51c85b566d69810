"""Country-capital conflict (CCC; Stoehr et al., Table 1).

The context asserts a wrong capital, the question asks for the real one:

    "The capital of France is Rome. Q: What is the capital of France? A:" -> " Paris" / " Rome"

``correct`` is the real capital, ``wrong`` the in-context one. The corrupted prompt states
the true capital, so it has the same token length and an uncontested answer.

Named positions (``ds.positions``, character spans of the template's slots read at their
last token): ``country`` (its first mention, in the context), ``context`` (the capital the
context states: the wrong one in the clean prompt), ``query`` (the country in the
question); ``end`` is implied.

``CCC_TEMPLATES`` holds phrasings of different token lengths (index 0 is the one above);
``template`` picks one or several. Every template sees the same (country, wrong capital)
pairs, so with one seed the datasets of two templates hold the same facts in the same
order (whenever the tokenizer keeps the same items, as it does for SmolLM2 and the tiny
tokenizer), and their train/test splits line up: testing one template's intervention on
another's test split then changes only the phrasing (seed paper 003, Sec. 5).

Table 2's column C ("a different template", prompts "of the same length in order for
ACTIVSCALAR and STEERVEC to be applicable", but "the position i of task-relevant tokens
changes") needs a paraphrase with template 0's token length. ``CCC_PARAPHRASES`` holds
candidates; ``ccc_paraphrase`` builds the first whose prompts have the length of
template 0's for this tokenizer (SmolLM2: "In {country} the capital is {capital}. ...":
the country moves from token 3 to token 1; every item's length is template 0's).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from mechsteer._validate import nonneg_int, positive_int
from mechsteer.tasks.base import Candidate, ContrastiveDataset, candidate_records, fill_spans, template_indices
from mechsteer.tasks.records import from_records
from mechsteer.tasks.data import CCC_EXCLUDE, CCC_TEMPLATES, COUNTRY_CAPITALS


# Same meaning as CCC_TEMPLATES[0], other word order; each keeps the slots' order (country,
# capital, country). Token length equal to template 0's: the first on SmolLM2 and GPT-2
# style BPEs with "The"/"In" one token each, the second on mechsteer's tiny tokenizer.
CCC_PARAPHRASES: list[str] = [
    "In {country} the capital is {capital}. Q: What is the capital of {country}? A:",
    "In {country} capital is {capital}. Q: What is the capital of {country}? A:",
    "For {country} the capital is {capital}. Q: What is the capital of {country}? A:",
]


def _template_indices(template: int | Sequence[int] | None) -> list[int]:
    return template_indices("ccc", template, len(CCC_TEMPLATES))


def ccc_candidates(
    seed: int = 0, per_country: int = 3, templates: Sequence[int] = (0,), token_length: Callable[[str], int] | None = None
) -> list[Candidate]:
    """All CCC candidates: each country paired with ``per_country`` wrong capitals, in
    each chosen template (indices into ``CCC_TEMPLATES``).

    ``token_length`` (a capital -> its token count for a model) draws each country's wrong
    capitals among the capitals of its true capital's token length (the nearest lengths
    when too few have it), so a clean prompt and its corrupted twin have one length; None
    draws among all capitals (the historical pairing)."""
    templates = [(t, CCC_TEMPLATES[t]) for t in _template_indices(templates)]
    return _candidates(seed, per_country, templates, token_length)


def _candidates(seed: int, per_country: int, templates: list[tuple], token_length) -> list[Candidate]:
    """``ccc_candidates`` on ``(meta template id, template string)`` pairs."""
    rng = random.Random(nonneg_int("seed", seed))
    pairs = [(c, k) for c, k in COUNTRY_CAPITALS if k not in CCC_EXCLUDE and c != k]
    capitals = [k for _, k in pairs]
    per_country = positive_int("per_country", per_country)
    if per_country > len(capitals) - 1:
        raise ValueError(f"per_country must be at most {len(capitals) - 1} (the other capitals), got {per_country}.")
    length = {k: token_length(k) for k in capitals} if token_length is not None else {}
    out = []
    for country, capital in pairs:
        others = [k for k in capitals if k != capital]
        if token_length is not None:
            gap = {k: abs(length[k] - length[capital]) for k in others}
            others = [k for k in others if gap[k] <= sorted(gap.values())[per_country - 1]]
        for wrong in rng.sample(others, per_country):
            for t, text in templates:
                prompt, spans = fill_spans(text, {"country": country, "capital": wrong})
                where = [(lo, hi) for _, lo, hi in spans]  # country, capital, country
                out.append(
                    Candidate(
                        prompt=prompt,
                        corrupted=text.format(country=country, capital=capital),
                        correct=" " + capital,
                        wrong=" " + wrong,
                        meta={"country": country, "capital": capital, "in_context": wrong, "template": t},
                        positions={"country": where[0], "context": where[1], "query": where[2]},
                    )
                )
    return out


def ccc(
    model, n: int | None = 64, seed: int = 0, template: int | list[int] | None = 0, same_length: bool = True
) -> ContrastiveDataset:
    """Build the CCC dataset for ``model``'s tokenizer (``n`` items, or all valid if None),
    through ``from_records``, shuffled by ``seed``.

    ``template`` picks one index into ``CCC_TEMPLATES`` (default 0, the paper's), a list,
    or None for all. ``same_length=True`` keeps single-token answers and the largest group
    of equal-length prompts (the historical dataset); ``same_length=False`` keeps every
    valid item: prompts of mixed lengths (right-padded) and multi-token answers, each
    country's wrong capitals drawn among capitals of its true capital's token length (so
    the corrupted twin, which states the true capital, has the clean prompt's length).

    >>> from mechsteer.tiny import tiny_model
    >>> ds = ccc(tiny_model("gpt2"), n=8)
    >>> len(ds), ds.tokens.shape[0] == len(ds.correct)
    (8, True)
    >>> short = ccc(tiny_model("gpt2"), n=8, template=1)
    >>> short.prompts[0].endswith("? A:"), short.n_pos < ds.n_pos
    (True, True)
    """
    n, seed = positive_int("n", n, allow_none=True), nonneg_int("seed", seed)
    length = None if same_length else (lambda k: len(model.tokenizer(" " + k, add_special_tokens=False)["input_ids"]))
    records = candidate_records(ccc_candidates(seed, templates=_template_indices(template), token_length=length))
    return from_records(model, records, name="ccc", n=n, seed=seed, min_items=2, same_length=same_length,
                        single_token=same_length, warn=False)


def ccc_paraphrase(model, n: int | None = 64, seed: int = 0, like: int = 0) -> ContrastiveDataset:
    """CCC in the first of ``CCC_PARAPHRASES`` whose prompts have the token length of
    template ``like``'s (same facts, same order, same split as ``ccc(model, n, seed,
    template=like)`` when every item keeps that length): Table 2's column C for
    position-bound interventions. ValueError naming the lengths if none matches.

    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("gpt2")
    >>> para, base = ccc_paraphrase(model, n=8), ccc(model, n=8)
    >>> para.n_pos == base.n_pos, para.prompts[0] != base.prompts[0], para.correct.tolist() == base.correct.tolist()
    (True, True, True)
    """
    n, seed = positive_int("n", n, allow_none=True), nonneg_int("seed", seed)
    target = ccc(model, n=n, seed=seed, template=like).n_pos
    got = {}
    for k, text in enumerate(CCC_PARAPHRASES):
        records = candidate_records(_candidates(seed, 3, [(f"paraphrase {k}", text)], None))
        ds = from_records(model, records, name="ccc", n=n, seed=seed, min_items=2, same_length=True,
                          single_token=True, warn=False)
        if ds.n_pos == target:
            return ds
        got[text] = ds.n_pos
    raise ValueError(f"No CCC paraphrase has template {like}'s {target} tokens for this tokenizer (lengths: {got}); "
                     "add one to mechsteer.tasks.ccc.CCC_PARAPHRASES, or use slots (Intervention.for_dataset).")
