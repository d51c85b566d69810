"""Bring your own data: a contrastive dataset from records (dicts, a DataFrame, JSONL/JSON/CSV).

Each record holds four strings and an optional position map::

    {"prompt": "The capital of France is Rome. Q: What is the capital of France? A:",
     "corrupted": "The capital of France is Paris. Q: What is the capital of France? A:",
     "correct": " Paris", "wrong": " Rome",
     "positions": {"country": "France", "context": [25, 29]}}

- **Order.** Items stay in the order given; ``n`` keeps the first n valid ones, ``seed``
  (optional) shuffles the valid items first, as the built-in tasks do.
- **Any length.** Prompts of different token lengths are right-padded into one batch;
  ``ds.lengths`` holds each prompt's real length and methods read the answer at ``ds.last``
  (``mechsteer.tasks.positions`` says why right padding is exact for causal models).
- **Twins.** A clean prompt and its corrupted twin must have one token length (patching
  compares them token by token). A pair that does not is dropped with the reason
  ``corrupted_length_differs`` and a warning naming the first record, or, with
  ``strict=True``, refused with a ValueError naming the record. Never misaligned.
- **Multi-token answers.** Answers are tokenised in the context of the prompt (the tokens
  of ``prompt + answer`` after those of ``prompt``). Their shared prefix is appended to both
  the clean and the corrupted prompt, and ``correct``/``wrong`` are the first tokens where
  they differ: the logit difference there works with every method (DLA included).
  ``ds.teacher_forced(model)`` + ``metric="answer_logprob"`` scores the whole answer,
  sum_t log p(a_t | prompt, a_<t): nonlinear in the logits, so for patching and AtP only.
- **Named positions.** ``positions`` maps a name to a word or substring of the prompt (its
  first occurrence, a whole-word match preferred) or to a ``[start, end)`` character span
  (for a later occurrence); in a CSV file it is a JSON string. A name is read at **the
  token holding its last character** (a multi-token word at its last token), found through
  the tokenizer's character offsets (a fast tokenizer; the BOS token is accounted for).
  ``ds.positions[b]`` maps each name to a token index; ``"end"`` (the last token) is implied.
- **Errors.** Malformed input always raises, naming the record index and the column: a
  missing column, a non-string value, an empty prompt, an answer that tokenises to nothing,
  a position not found in the prompt. Answers that are equal (or one a prefix of the
  other), duplicates and length mismatches are dropped (``ds.dropped``), or refused with
  ``strict=True``.
"""

from __future__ import annotations

import json
import math
import random
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from mechsteer._validate import nonneg_int, positive_int
from mechsteer.tasks.dataset import ContrastiveDataset

COLUMNS = ("prompt", "corrupted", "correct", "wrong")


def load_records(records) -> list[dict[str, Any]]:
    """``records`` (a list of dicts, a pandas DataFrame, or a path to .jsonl / .json / .csv)
    as a list of dicts, in order.

    >>> load_records([{"prompt": "a", "corrupted": "b", "correct": " x", "wrong": " y"}])[0]["wrong"]
    ' y'
    """
    if isinstance(records, (str, Path)):
        return _read_file(Path(records))
    if hasattr(records, "to_dict") and hasattr(records, "columns"):  # a pandas DataFrame
        return [dict(r) for r in records.to_dict("records")]
    if isinstance(records, (list, tuple)):
        for i, r in enumerate(records):
            if not isinstance(r, dict):
                raise TypeError(f"record {i} is a {type(r).__name__} ({r!r:.60}); each record must be a dict with "
                                f"the columns {COLUMNS}.")
        return [dict(r) for r in records]
    raise TypeError(f"records must be a list of dicts, a pandas DataFrame or a path to a .jsonl/.json/.csv file, "
                    f"got {type(records).__name__}.")


def _read_file(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"records file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {line_no} (record {len(out)}) is not valid JSON: {e}.") from None
        return load_records(out)
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path} holds a JSON {type(data).__name__}; it must hold a list of records.")
        return load_records(data)
    if suffix == ".csv":
        import pandas as pd

        return load_records(pd.read_csv(path, dtype=str, keep_default_na=False))
    raise ValueError(f"records file {str(path)!r} has suffix {suffix!r}; use .jsonl, .json or .csv.")


def _nan(v) -> bool:
    """None or NaN: a DataFrame's empty cell."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def _missing(v) -> bool:
    return _nan(v) or (isinstance(v, str) and not v.strip())


def _find(text: str, word: str) -> tuple[int, int] | None:
    """Character span of ``word``'s first occurrence in ``text``, preferring a whole-word match."""
    m = re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text)
    start = m.start() if m else text.find(word)
    return None if start < 0 else (start, start + len(word))


def _check(name: str, i: int, r: dict) -> dict[str, Any]:
    """Record ``i`` with its strings checked and its positions as character spans."""
    where = f"{name}: record {i}"
    for col in COLUMNS:
        if col not in r:
            raise ValueError(f"{where} has no {col!r} column (it has {sorted(map(str, r))}); every record needs "
                             f"{', '.join(COLUMNS)}.")
        if not isinstance(r[col], str):
            raise TypeError(f"{where}, column {col!r}: expected a string, got {type(r[col]).__name__} ({r[col]!r}).")
    for col in ("prompt", "corrupted"):
        if not r[col].strip():
            raise ValueError(f"{where}, column {col!r}: the {col} prompt is empty; give the text the model reads.")
    spans: dict[str, tuple[int, int]] = {}
    pos = r.get("positions")
    if isinstance(pos, str) and pos.strip():
        try:
            pos = json.loads(pos)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}, column 'positions': not valid JSON ({e}); write e.g. "
                             '{"country": "France"} or {"country": [16, 22]}.') from None
    if not _missing(pos):
        if not isinstance(pos, dict):
            raise TypeError(f"{where}, column 'positions': expected a dict name -> word or [start, end), "
                            f"got {type(pos).__name__} ({pos!r}).")
        for key, v in pos.items():
            if not isinstance(key, str) or key == "end":
                raise ValueError(f"{where}, column 'positions': name {key!r} must be a string other than 'end' "
                                 "(the last token is always named 'end').")
            spans[key] = _span(where, r["prompt"], key, v)
    meta = {k: v for k, v in r.items() if k not in COLUMNS and k != "positions" and not _nan(v)}  # extra columns
    return {**{c: r[c] for c in COLUMNS}, "spans": spans, "meta": {**meta, "record": i}}


def _span(where: str, prompt: str, key: str, v) -> tuple[int, int]:
    if isinstance(v, str):
        span = _find(prompt, v) if v else None
        if span is None:
            raise ValueError(f"{where}, column 'positions': {key!r} -> {v!r} is not found in the prompt {prompt!r}.")
        return span
    ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    if not ok:
        raise TypeError(f"{where}, column 'positions': {key!r} -> {v!r}; give a word of the prompt or a "
                        "[start, end) character span.")
    if not 0 <= v[0] < v[1] <= len(prompt):
        raise ValueError(f"{where}, column 'positions': span {key!r} -> {list(v)} is not within the prompt "
                         f"(0 <= start < end <= {len(prompt)}).")
    return int(v[0]), int(v[1])


def _answer_ids(model, prompt_ids: list[int], prompt: str, answer: str) -> list[int]:
    """Tokens of ``answer`` as read after ``prompt``: those of ``prompt + answer`` past the
    prompt's; the answer alone (no special tokens) when the prompt's tokens change."""
    full = model.to_tokens(prompt + answer)[0].tolist()
    if len(full) > len(prompt_ids) and full[: len(prompt_ids)] == prompt_ids:
        return full[len(prompt_ids):]
    return list(model.tokenizer(answer, add_special_tokens=False)["input_ids"])


def _token_index(model, where: str, prompt: str, n_ids: int, spans: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Token index of each span: the token holding its last character."""
    if not spans:
        return {}
    try:
        offs = model.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError) as e:
        raise TypeError(f"{where}: named positions need a fast tokenizer with character offsets ({e}).") from None
    bos = n_ids - len(offs)  # model.to_tokens may prepend a BOS token
    if bos not in (0, 1):
        raise ValueError(f"{where}: the tokenizer's offsets ({len(offs)} tokens) do not match model.to_tokens "
                         f"({n_ids} tokens); named positions cannot be placed.")
    out = {}
    for key, (lo, hi) in spans.items():
        c = hi - 1
        hits = [j for j, (s, e) in enumerate(offs) if s <= c < e] or [j for j, (s, e) in enumerate(offs) if s <= c]
        if not hits:
            raise ValueError(f"{where}, column 'positions': no token covers {key!r} (characters {lo}..{hi}).")
        out[key] = hits[0] + bos
    return out


def _prefix(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def from_records(
    model,
    records,
    *,
    name: str = "data",
    strict: bool = False,
    n: int | None = None,
    seed: int | None = None,
    min_items: int = 1,
    same_length: bool = False,
    single_token: bool = False,
    warn: bool = True,
) -> ContrastiveDataset:
    """A ``ContrastiveDataset`` for ``model`` from your records (module docstring: the columns,
    the padding, multi-token answers, named positions, errors).

    ``records``: a list of dicts, a pandas DataFrame or a path to .jsonl / .json / .csv.
    ``n``: keep the first n valid items; ``seed``: shuffle the valid items first (None keeps
    your order). ``strict``: raise on a record that would be dropped. ``same_length`` keeps
    only the largest group of one token length and ``single_token`` only single-token
    answers (the built-in tasks' historical datasets); ``warn=False`` silences the warning
    that counts dropped records. ValueError when fewer than ``min_items`` remain.

    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("llama")
    >>> ds = from_records(model, [
    ...     {"prompt": "When Mary met John, John gave it to", "corrupted": "When Mary met John, Mary gave it to",
    ...      "correct": " Mary", "wrong": " John", "positions": {"IO": "Mary", "S1": "John", "S2": [20, 24]}},
    ...     {"prompt": "Snow is", "corrupted": "Grass is", "correct": " white", "wrong": " green"}])
    >>> ds.lengths.tolist(), ds.positions[0], ds.positions[1]
    ([11, 6], {'IO': 2, 'S1': 4, 'S2': 6}, {})
    """
    n = positive_int("n", n, allow_none=True)
    seed = None if seed is None else nonneg_int("seed", seed)
    min_items = positive_int("min_items", min_items)
    for key, v in (("strict", strict), ("same_length", same_length), ("single_token", single_token), ("warn", warn)):
        if not isinstance(v, bool):
            raise TypeError(f"{key} must be True or False, got {v!r} ({type(v).__name__}).")
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__} ({name!r}).")
    rows = load_records(records)
    checked = [_check(name, i, r) for i, r in enumerate(rows)]  # malformed input raises before any drop
    dropped: Counter[str] = Counter()
    first: dict[str, int] = {}

    def drop(i: int, reason: str, detail: str) -> None:
        if strict:
            raise ValueError(f"{name}: record {i}: {detail} (strict=True refuses it; strict=False drops it as {reason!r}).")
        dropped[reason] += 1
        first.setdefault(reason, i)

    kept: list[dict[str, Any]] = []
    seen: set[tuple[str, ...]] = set()
    for i, r in enumerate(checked):
        where = f"{name}: record {i}"
        key = tuple(r[c] for c in COLUMNS)
        if key in seen:
            drop(i, "duplicate", "it repeats an earlier record")
            continue
        seen.add(key)
        clean = model.to_tokens(r["prompt"])[0].tolist()
        c_ids, w_ids = (_answer_ids(model, clean, r["prompt"], r[a]) for a in ("correct", "wrong"))
        for col, ids in (("correct", c_ids), ("wrong", w_ids)):
            if not ids:
                raise ValueError(f"{where}, column {col!r}: the answer {r[col]!r} tokenises to nothing; give its text, "
                                 "e.g. ' Paris' (with the leading space the model reads).")
        positions = _token_index(model, where, r["prompt"], len(clean), r["spans"])
        if single_token and (len(c_ids) > 1 or len(w_ids) > 1):
            drop(i, "answer_not_single_token", f"an answer has several tokens ({r['correct']!r}, {r['wrong']!r})")
            continue
        if r["correct"] == r["wrong"] or c_ids == w_ids:
            drop(i, "answers_equal", f"the correct and wrong answers are equal ({r['correct']!r})")
            continue
        k = _prefix(c_ids, w_ids)
        if k == min(len(c_ids), len(w_ids)):
            drop(i, "answer_is_prefix", f"one answer is a prefix of the other ({r['correct']!r}, {r['wrong']!r}); "
                 "no token tells them apart")
            continue
        corrupt = model.to_tokens(r["corrupted"])[0].tolist()
        if len(corrupt) != len(clean):
            drop(i, "corrupted_length_differs", f"the prompt has {len(clean)} tokens, its corrupted twin {len(corrupt)}; "
                 "they must match for position-wise patching")
            continue
        meta = {**r["meta"], **({"answer_prefix": model.tokenizer.decode(c_ids[:k])} if k else {})}
        kept.append(dict(r, clean=clean + c_ids[:k], corrupt=corrupt + c_ids[:k], c_ids=c_ids, w_ids=w_ids, k=k,
                         positions=positions, meta=meta))
    if kept and same_length:
        counts = Counter(len(x["clean"]) for x in kept)
        modal = max(counts, key=lambda L: (counts[L], -L))
        for x in kept:
            if len(x["clean"]) != modal:
                drop(x["meta"]["record"], "length_not_modal", f"its {len(x['clean'])} tokens differ from the most common "
                     f"length {modal} (same_length=True)")
        kept = [x for x in kept if len(x["clean"]) == modal]
    if dropped and warn:
        detail = ", ".join(f"{k}: {v} (first: record {first[k]})" for k, v in dropped.items())
        warnings.warn(f"{name}: dropped {sum(dropped.values())} of {len(rows)} records ({detail}); ds.dropped counts "
                      "them, strict=True raises instead.", stacklevel=2)
    if seed is not None:
        random.Random(seed).shuffle(kept)
    if n is not None:
        kept = kept[:n]
    if len(kept) < min_items:
        raise ValueError(f"{name}: only {len(kept)} valid items for this tokenizer (need at least {min_items}; "
                         f"dropped: {dict(dropped)}). Add items or use another model.")
    if n is not None and len(kept) < n:
        warnings.warn(f"{name}: asked for {n} items, {len(kept)} are valid for this tokenizer.", stacklevel=2)
    return _assemble(model, name, kept, dropped, seed)


def _assemble(model, name: str, kept: list[dict], dropped: Counter, seed: int | None) -> ContrastiveDataset:
    tokenizer, device = model.tokenizer, model.cfg.device
    pad = pad_token_id(tokenizer)
    width = max(len(x["clean"]) for x in kept)
    padded = lambda ids: ids + [pad] * (width - len(ids))  # noqa: E731
    tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=device)  # noqa: E731
    texts = lambda x, col: x[col] + x["meta"].get("answer_prefix", "")  # noqa: E731  the text the model reads
    return ContrastiveDataset(
        name=name,
        prompts=[texts(x, "prompt") for x in kept],
        corrupted_prompts=[texts(x, "corrupted") for x in kept],
        correct_answers=[x["correct"] for x in kept],
        wrong_answers=[x["wrong"] for x in kept],
        tokens=tensor([padded(x["clean"]) for x in kept]),
        corrupted_tokens=tensor([padded(x["corrupt"]) for x in kept]),
        correct=tensor([x["c_ids"][x["k"]] for x in kept]),
        wrong=tensor([x["w_ids"][x["k"]] for x in kept]),
        str_tokens=[[tokenizer.decode([t]) for t in x["clean"]] for x in kept],
        dropped={k: v for k, v in dropped.items() if v},
        seed=0 if seed is None else seed,
        meta=[x["meta"] for x in kept],
        lengths=tensor([len(x["clean"]) for x in kept]),
        positions=[x["positions"] for x in kept],
        pad_id=pad,
        correct_tokens=[x["c_ids"] for x in kept],
        wrong_tokens=[x["w_ids"] for x in kept],
    ).validate_for(model)


def single_token(tokenizer, text: str) -> int | None:
    """The id of ``text`` if it is exactly one token (no special tokens added), else None."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def pad_token_id(tokenizer) -> int:
    """The id right-padding uses: the tokenizer's pad token, else its end-of-text, else 0.
    Any id would do: pads sit after a prompt's last token, which never attends to them."""
    for key in ("pad_token_id", "eos_token_id"):
        t = getattr(tokenizer, key, None)
        if isinstance(t, int):
            return t
    return 0
