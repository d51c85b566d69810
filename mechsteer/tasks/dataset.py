"""The contrastive dataset: clean and corrupted prompts with a correct and a wrong answer.

``ContrastiveDataset`` holds prompts of any token length, right-padded (see
``mechsteer.tasks.positions`` for why right): prompt b's real tokens are at 0..L_b-1 and
every method reads its answer at ``ds.last[b]`` (= L_b - 1). A clean prompt and its
corrupted twin always have one length. Build one with ``mechsteer.tasks.from_records``
(your own data) or a task (``ccc``, ``ioi``).

Multi-token answers: ``correct_tokens``/``wrong_tokens`` hold every token of each answer;
their shared prefix is already part of the prompt, and ``correct``/``wrong`` are the first
tokens where they differ (the logit-difference metric reads those). ``teacher_forced``
builds the dataset on which ``mechsteer.metrics.answer_logprob`` sums the log-probability
of a whole answer.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechsteer._validate import check_finite, positive_int


@dataclass(frozen=True)
class ContrastiveDataset:
    """Clean and corrupted prompts (right-padded to one width) with a correct and a wrong answer.

    ``tokens`` and ``corrupted_tokens`` are ``(batch, pos)``; ``correct`` and ``wrong``
    are ``(batch,)`` token ids of the answers' first differing tokens, read at each
    prompt's last token ``last``.

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
    # per prompt: the answer tokens a teacher-forced dataset scores (``teacher_forced``); the
    # prompt then ends with all of them but the last, whose log-probs ``answer_logprob`` sums
    target_tokens: list[list[int]] = field(default_factory=list)

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
        for key in ("positions", "correct_tokens", "wrong_tokens", "target_tokens"):
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
        >>> from mechsteer.tasks import from_records
        >>> ds = from_records(model, [dict(prompt="a b", corrupted="a c", correct=" Paris", wrong=" Rome")])
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
            target_tokens=pick(self.target_tokens) if self.target_tokens else [],
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

    def teacher_forced(self, model, answer: str = "correct") -> "ContrastiveDataset":
        """The dataset whose prompts end with ``answer``'s tokens but the last (teacher forcing):
        clean b = prompt_b + a_1..a_{T-1}, corrupted b = corrupted_b + the same tokens, with
        ``target_tokens[b]`` = a_1..a_T. ``metric="answer_logprob"`` on it is
        sum_t log p(a_t | prompt, a_<t) (``mechsteer.metrics.answer_logprob``); ``answer`` is
        "correct" or "wrong". The answers' shared prefix is re-read from the prompt's end.

        >>> from mechsteer.tiny import tiny_model
        >>> from mechsteer.tasks import from_records
        >>> model = tiny_model("gpt2")
        >>> ds = from_records(model, [dict(prompt="The capital of Denmark is", corrupted="The capital of Germany is",
        ...                                correct=" Copenhagen", wrong=" Berlin")])
        >>> tf = ds.teacher_forced(model)
        >>> tf.n_pos - ds.n_pos == len(tf.target_tokens[0]) - 1
        True
        """
        if answer not in ("correct", "wrong"):
            raise ValueError(f"answer must be 'correct' or 'wrong', got {answer!r}.")
        if self.target_tokens:
            raise ValueError(f"Dataset {self.name!r} is already teacher-forced; call teacher_forced on the original dataset.")
        answers = self.correct_tokens if answer == "correct" else self.wrong_tokens
        clean, corrupt, strs = [], [], []
        for b, ans in enumerate(answers):
            c, w = self.correct_tokens[b], self.wrong_tokens[b]
            k = next((i for i, (x, y) in enumerate(zip(c, w)) if x != y), min(len(c), len(w)))  # shared prefix
            P = int(self.lengths[b]) - k  # the prompt without the shared prefix
            clean.append(self.tokens[b, :P].tolist() + list(ans[:-1]))
            corrupt.append(self.corrupted_tokens[b, :P].tolist() + list(ans[:-1]))
            strs.append(self.str_tokens[b][:P] + [model.tokenizer.decode([t]) for t in ans[:-1]])
        width = max(len(x) for x in clean)
        pad = lambda ids: ids + [self.pad_id] * (width - len(ids))  # noqa: E731
        dev = self.tokens.device
        return replace(
            self,
            name=f"{self.name}:{answer}",
            tokens=torch.tensor([pad(x) for x in clean], dtype=torch.long, device=dev),
            corrupted_tokens=torch.tensor([pad(x) for x in corrupt], dtype=torch.long, device=dev),
            lengths=torch.tensor([len(x) for x in clean], dtype=torch.long, device=self.lengths.device),
            str_tokens=strs,
            target_tokens=[list(a) for a in answers],
        ).validate_for(model)

    def split(self, test_fraction: float = 0.25) -> tuple["ContrastiveDataset", "ContrastiveDataset"]:
        """Deterministic (train, test) split in dataset order: the last ``test_fraction`` is the test set
        (the built-in tasks are already shuffled by their seed; ``from_records`` keeps your order)."""
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


