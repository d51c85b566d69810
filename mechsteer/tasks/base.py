"""Contrastive datasets: (prompt, correct answer token, wrong answer token) + corrupted prompt.

A dataset is built *for a model's tokenizer*: candidate items are tokenised, those that
fail a check are dropped and counted by reason. Prompts may differ in token length: they
are right-padded (``mechsteer.tasks.positions`` says why) and every method reads the
answer at each prompt's own last token ``ds.last``. A clean prompt and its corrupted twin
always have one length (position-wise patching compares them token by token).
Generation is deterministic given a seed.
"""

from __future__ import annotations

import numbers
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechsteer._validate import check_finite, nonneg_int, positive_int


@dataclass(frozen=True)
class Candidate:
    """One generated item before tokenisation."""

    prompt: str
    corrupted: str
    correct: str  # answer text with the leading space the model uses, e.g. " Paris"
    wrong: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ContrastiveDataset:
    """Clean and corrupted prompts of one token length with single-token answers.

    ``tokens`` and ``corrupted_tokens`` are ``(batch, pos)``; ``correct`` and ``wrong``
    are ``(batch,)`` token ids of the answers at the last position.

    Construction checks what needs no model: integer ids >= 0, matching shapes and list
    lengths, at least one item. ``validate_for(model)`` checks the ids against the model's
    vocabulary and context; ``build_dataset``, ``logit_diffs`` and ``evaluate`` call it.
    """

    name: str
    prompts: list[str]
    corrupted_prompts: list[str]
    correct_answers: list[str]
    wrong_answers: list[str]
    tokens: Int[Tensor, "batch pos"]
    corrupted_tokens: Int[Tensor, "batch pos"]
    correct: Int[Tensor, " batch"]
    wrong: Int[Tensor, " batch"]
    str_tokens: list[list[str]]  # per prompt, for plot labels
    dropped: dict[str, int]  # reason -> count of candidates dropped
    seed: int
    meta: list[dict[str, Any]] = field(default_factory=list)
    # real token count per prompt (clean = corrupted); None = every row is full width
    lengths: Int[Tensor, " batch"] | None = None
    # per prompt: position name -> token index (e.g. IOI's "IO", "S1", "S2"); "end" is implied
    positions: list[dict[str, int]] = field(default_factory=list)
    pad_id: int = 0  # token id after each prompt's end (never seen by its real tokens)
    # per prompt: every token id of each answer; a multi-token answer's shared prefix with the
    # other answer is part of the prompt, so correct/wrong hold the first tokens that differ
    correct_tokens: list[list[int]] = field(default_factory=list)
    wrong_tokens: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not len(self.prompts):
            raise ValueError(f"Dataset {self.name!r} is empty (0 prompts); a dataset needs at least one item.")
        n = len(self.prompts)
        for key, ndim in (("tokens", 2), ("corrupted_tokens", 2), ("correct", 1), ("wrong", 1)):
            x = getattr(self, key)
            if not isinstance(x, Tensor) or x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
                got = f"{x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
                raise TypeError(f"{key} must be a tensor of integer token ids (torch.long), got a {got}; "
                                "build it with model.to_tokens(...) or torch.tensor(ids, dtype=torch.long).")
            want = "(batch, pos)" if ndim == 2 else "(batch,)"
            if x.ndim != ndim or x.shape[0] != n or x.shape[-1] == 0:
                raise ValueError(f"{key} has shape {tuple(x.shape)}; expected {want} with batch = {n} "
                                 "(one row per prompt) and pos >= 1.")
            if x.numel() and int(x.min()) < 0:
                raise ValueError(f"{key} holds a negative token id ({int(x.min())}); token ids are >= 0.")
        if self.corrupted_tokens.shape != self.tokens.shape:
            raise ValueError(f"corrupted_tokens has shape {tuple(self.corrupted_tokens.shape)}, tokens "
                             f"{tuple(self.tokens.shape)}; clean and corrupted prompts must have one token length.")
        for key in ("corrupted_prompts", "correct_answers", "wrong_answers", "str_tokens"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"{key} has {len(getattr(self, key))} entries for {n} prompts; give one per prompt.")
        if self.meta and len(self.meta) != n:
            raise ValueError(f"meta has {len(self.meta)} entries for {n} prompts; give one per prompt or none.")
        width = self.tokens.shape[1]
        lengths = self.lengths
        if lengths is None:
            lengths = torch.full((n,), width, dtype=torch.long, device=self.tokens.device)
        elif not isinstance(lengths, Tensor) or lengths.shape != (n,) or lengths.is_floating_point():
            raise ValueError(f"lengths must be a (batch,) integer tensor with batch = {n}, got {lengths!r}.")
        elif int(lengths.min()) < 1 or int(lengths.max()) > width:
            raise ValueError(f"lengths must lie in 1..{width} (the padded width), got {lengths.tolist()}.")
        object.__setattr__(self, "lengths", lengths.long())
        for key in ("positions", "correct_tokens", "wrong_tokens"):
            if getattr(self, key) and len(getattr(self, key)) != n:
                raise ValueError(f"{key} has {len(getattr(self, key))} entries for {n} prompts; give one per prompt or none.")
        if not self.correct_tokens:
            object.__setattr__(self, "correct_tokens", [[int(t)] for t in self.correct.tolist()])
        if not self.wrong_tokens:
            object.__setattr__(self, "wrong_tokens", [[int(t)] for t in self.wrong.tolist()])

    def validate_for(self, model) -> "ContrastiveDataset":
        """Return self if every token and answer id exists in ``model``'s vocabulary and the
        prompts fit its context; else ValueError naming the field, the id and the limit.

        >>> from mechsteer.tiny import tiny_model
        >>> model = tiny_model("gpt2")
        >>> ds = build_dataset("toy", model, [Candidate("a b", "a c", " Paris", " Rome")], n=None, seed=0, min_items=1)
        >>> ds.validate_for(model) is ds
        True
        """
        cfg = getattr(model, "cfg", None)
        if cfg is None or not hasattr(cfg, "d_vocab"):
            raise TypeError(f"model must be a TransformerLens model with .cfg.d_vocab, got {type(model).__name__}.")
        for key in ("tokens", "corrupted_tokens", "correct", "wrong"):
            top = int(getattr(self, key).max())
            if top >= cfg.d_vocab:
                raise ValueError(f"{key} holds token id {top}, beyond the model's vocabulary (d_vocab = {cfg.d_vocab}, "
                                 "ids 0..d_vocab-1); build the dataset with this model's tokenizer.")
        n_ctx = getattr(cfg, "n_ctx", None)
        if isinstance(n_ctx, int) and self.n_pos > n_ctx:
            raise ValueError(f"The prompts have {self.n_pos} tokens, more than the model's context (n_ctx = {n_ctx}).")
        return self

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def n_pos(self) -> int:
        """Padded token width: the longest prompt's length."""
        return self.tokens.shape[1]

    @property
    def is_padded(self) -> bool:
        """True when some prompt is shorter than ``n_pos`` (the batch holds pads)."""
        return bool((self.lengths < self.n_pos).any())

    @property
    def last(self) -> Int[Tensor, " batch"]:
        """Each prompt's last real token index, ``lengths - 1``: where the answer is read."""
        return self.lengths - 1

    @property
    def answer_pos(self) -> int | Int[Tensor, " batch"]:
        """``-1`` when every prompt is full width (the fast, historical read), else ``last``;
        pass it as ``pos=`` to the metrics of ``mechsteer.metrics``."""
        return self.last if self.is_padded else -1

    @property
    def mask(self) -> Tensor:
        """``(batch, pos)`` bool: True at real tokens, False at pads."""
        return torch.arange(self.n_pos, device=self.lengths.device)[None, :] < self.lengths[:, None]

    @property
    def multi_token(self) -> bool:
        """True when some answer has more than one token."""
        return any(len(t) > 1 for t in self.correct_tokens + self.wrong_tokens)

    def position_axis(self, mode: str = "auto"):
        """The ``PositionAxis`` per-position results use (``mechsteer.tasks.positions``)."""
        from mechsteer.tasks.positions import position_axis

        return position_axis(self, mode)

    @property
    def labels(self) -> list[str]:
        """Position labels for plots: ``"{pos}:{token}"`` of the first prompt for equal
        lengths, else the named or end-relative labels of ``position_axis()``."""
        return self.position_axis().labels

    def subset(self, index: Sequence[int] | slice) -> "ContrastiveDataset":
        """The items at ``index`` (a slice or a list of ints), as a new dataset."""
        if hasattr(index, "tolist") and not isinstance(index, (list, tuple)):  # a tensor or an array
            index = index.tolist()
        if isinstance(index, (str, bytes)) or not isinstance(index, (slice, Sequence, range)):
            raise TypeError(f"index must be a slice or a list of ints, got {type(index).__name__} ({index!r}).")
        idx = list(range(len(self)))[index] if isinstance(index, slice) else list(index)
        bad = [i for i in idx if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
        if bad:
            raise TypeError(f"index must hold ints, got {bad[0]!r} ({type(bad[0]).__name__}).")
        out = [i for i in idx if not -len(self) <= i < len(self)]
        if out:
            raise ValueError(f"index {out[0]} is out of range: this dataset has {len(self)} items (0..{len(self) - 1}).")
        if not idx:
            raise ValueError(f"index {index!r} selects no items; a dataset needs at least one.")
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        t = torch.tensor(idx, dtype=torch.long)
        lengths = self.lengths[t.to(self.lengths.device)]
        width = int(lengths.max())  # drop pad columns no kept prompt needs
        return replace(
            self,
            lengths=lengths,
            positions=pick(self.positions) if self.positions else [],
            correct_tokens=pick(self.correct_tokens),
            wrong_tokens=pick(self.wrong_tokens),
            prompts=pick(self.prompts),
            corrupted_prompts=pick(self.corrupted_prompts),
            correct_answers=pick(self.correct_answers),
            wrong_answers=pick(self.wrong_answers),
            tokens=self.tokens[t][:, :width],
            corrupted_tokens=self.corrupted_tokens[t][:, :width],
            correct=self.correct[t],
            wrong=self.wrong[t],
            str_tokens=pick(self.str_tokens),
            meta=pick(self.meta) if self.meta else [],
        )

    def split(self, test_fraction: float = 0.25) -> tuple["ContrastiveDataset", "ContrastiveDataset"]:
        """Deterministic (train, test) split; items are already shuffled by the seed."""
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
        n_test = max(1, round(len(self) * test_fraction))
        if n_test >= len(self):
            raise ValueError(f"Cannot split {len(self)} items with test_fraction={test_fraction}.")
        return self.subset(slice(0, len(self) - n_test)), self.subset(slice(len(self) - n_test, None))

    def to_frame(self):
        """One row per item: prompt, corrupted prompt, answers and their token ids."""
        import pandas as pd

        return pd.DataFrame(
            {
                "prompt": self.prompts,
                "corrupted_prompt": self.corrupted_prompts,
                "correct": self.correct_answers,
                "wrong": self.wrong_answers,
                "correct_id": self.correct.tolist(),
                "wrong_id": self.wrong.tolist(),
                "length": self.lengths.tolist(),
                "positions": self.positions or [{} for _ in self.prompts],
            }
        )

    def to(self, device: str | torch.device) -> "ContrastiveDataset":
        """The same dataset with its tensors on ``device``."""
        return replace(
            self,
            tokens=self.tokens.to(device),
            corrupted_tokens=self.corrupted_tokens.to(device),
            correct=self.correct.to(device),
            wrong=self.wrong.to(device),
            lengths=self.lengths.to(device),
        )

    @torch.no_grad()
    def logit_diffs(self, model, batch_size: int = 32) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"]]:
        """Per-prompt f_c - f_w at the last position on the clean and the corrupted prompts.

        Raises FloatingPointError when the model's last-position logits are not finite."""
        from mechsteer.metrics import logit_diff

        batch_size = positive_int("batch_size", batch_size)
        self.validate_for(model)
        out: dict[str, list[Tensor]] = {"clean": [], "corrupted": []}
        for start in range(0, len(self), batch_size):
            sl = slice(start, start + batch_size)
            for key, toks in (("clean", self.tokens), ("corrupted", self.corrupted_tokens)):
                logits = model(toks[sl].to(model.cfg.device))
                pos = self.last[sl].to(logits.device)
                check_finite(f"{self.name}: model logits at the last position of the {key} prompts",
                             logits[torch.arange(len(pos), device=logits.device), pos])
                out[key].append(logit_diff(logits, self.correct[sl], self.wrong[sl], pos=pos, reduce="none").cpu())
        return torch.cat(out["clean"]), torch.cat(out["corrupted"])

    def evaluate(self, model, batch_size: int = 32) -> dict[str, float | int]:
        """Fraction of prompts on which the model prefers the correct answer, and the mean
        logit difference, on clean and corrupted prompts."""
        clean, corrupt = self.logit_diffs(model, batch_size)
        return {
            "n": len(self),
            "accuracy": (clean > 0).float().mean().item(),
            "logit_diff": clean.mean().item(),
            "corrupted_accuracy": (corrupt > 0).float().mean().item(),
            "corrupted_logit_diff": corrupt.mean().item(),
        }


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


def single_token(tokenizer, text: str) -> int | None:
    """The id of ``text`` if it is exactly one token (no special tokens added), else None."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def build_dataset(
    name: str,
    model,
    candidates: Sequence[Candidate],
    *,
    n: int | None,
    seed: int,
    min_items: int = 2,
    same_length: bool = True,
) -> ContrastiveDataset:
    """Tokenise ``candidates`` for ``model``, drop invalid ones; with ``same_length`` keep
    the largest group of one token length, else right-pad prompts of any length.

    Drop reasons: ``answer_not_single_token``, ``answers_equal``,
    ``corrupted_length_differs``, ``length_not_modal`` (the prompt's token length differs
    from the most common one), ``duplicate``. Raises ValueError when fewer than
    ``min_items`` remain, naming the counts.
    """
    n = positive_int("n", n, allow_none=True)
    seed = nonneg_int("seed", seed)
    min_items = positive_int("min_items", min_items)
    tokenizer = model.tokenizer
    dropped: Counter[str] = Counter()
    kept: list[tuple[Candidate, list[int], list[int], int, int]] = []
    seen: set[str] = set()
    for c in candidates:
        if c.prompt in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(c.prompt)
        cid, wid = single_token(tokenizer, c.correct), single_token(tokenizer, c.wrong)
        if cid is None or wid is None:
            dropped["answer_not_single_token"] += 1
            continue
        if cid == wid:
            dropped["answers_equal"] += 1
            continue
        clean = model.to_tokens(c.prompt)[0].tolist()
        corrupt = model.to_tokens(c.corrupted)[0].tolist()
        if len(clean) != len(corrupt):
            dropped["corrupted_length_differs"] += 1
            continue
        kept.append((c, clean, corrupt, cid, wid))
    if kept and same_length:
        lengths = Counter(len(k[1]) for k in kept)
        modal = max(lengths, key=lambda L: (lengths[L], -L))
        dropped["length_not_modal"] += sum(v for L, v in lengths.items() if L != modal)
        kept = [k for k in kept if len(k[1]) == modal]
    random.Random(seed).shuffle(kept)
    if n is not None:
        kept = kept[:n]
    if len(kept) < min_items:
        raise ValueError(
            f"{name}: only {len(kept)} valid items for this tokenizer (need at least "
            f"{min_items}; dropped: {dict(dropped)}). Add facts or use another model."
        )
    if n is not None and len(kept) < n:
        warnings.warn(f"{name}: asked for {n} items, {len(kept)} are valid for this tokenizer.", stacklevel=3)
    device = model.cfg.device
    pad = pad_token_id(tokenizer)
    width = max((len(k[1]) for k in kept), default=1)
    padded = lambda ids: ids + [pad] * (width - len(ids))  # noqa: E731
    toks = torch.tensor([padded(k[1]) for k in kept], device=device)
    return ContrastiveDataset(
        name=name,
        prompts=[k[0].prompt for k in kept],
        corrupted_prompts=[k[0].corrupted for k in kept],
        correct_answers=[k[0].correct for k in kept],
        wrong_answers=[k[0].wrong for k in kept],
        tokens=toks,
        corrupted_tokens=torch.tensor([padded(k[2]) for k in kept], device=device),
        correct=torch.tensor([k[3] for k in kept], device=device),
        wrong=torch.tensor([k[4] for k in kept], device=device),
        str_tokens=[[tokenizer.decode([t]) for t in k[1]] for k in kept],
        dropped={k: v for k, v in dropped.items() if v},
        seed=seed,
        meta=[k[0].meta for k in kept],
        lengths=torch.tensor([len(k[1]) for k in kept], device=device),
        pad_id=pad,
    ).validate_for(model)


def pad_token_id(tokenizer) -> int:
    """The id right-padding uses: the tokenizer's pad token, else its end-of-text, else 0.
    Any id would do: pads sit after a prompt's last token, which never attends to them."""
    for name in ("pad_token_id", "eos_token_id"):
        t = getattr(tokenizer, name, None)
        if isinstance(t, int):
            return t
    return 0
