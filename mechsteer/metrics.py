"""Metrics on next-token logits, shared by every method.

All take logits of shape ``(batch, pos, vocab)`` (read at ``pos``, default the last) or
``(batch, vocab)``, and answer token ids of shape ``(batch,)``. ``reduce="mean"``
(default) returns a scalar, ``reduce="none"`` one value per prompt.

- ``logit_diff``: f_c - f_w, the correct minus the wrong answer's logit.
- ``answer_prob``: softmax(f)_a.
- ``kl_div``: KL(softmax(f_p) || softmax(f_q)) over the full vocabulary.
- ``answer_rank``: 0 when the answer is the top token.
- ``accuracy``: whether the answer is among the top k tokens.
- ``normalize``: (x - x_corrupted) / (x_clean - x_corrupted), so 1 = clean, 0 = corrupted.

Multi-token answers (``mechsteer.tasks.from_records``): the logit difference at the first
token where the answers differ (``ds.correct``/``ds.wrong``; their shared prefix is part of
the prompt) is linear in the logits and works with every method, DLA and AttnLRP included.
``answer_logprob`` (metric name ``"answer_logprob"``), the teacher-forced summed
log-probability of a whole answer on ``ds.teacher_forced(model)``, is nonlinear: patching
and attribution patching take it, DLA and AttnLRP must refuse it (``LINEAR_METRICS``).

Answer ids are checked against the vocabulary (``0..vocab-1``), and a metric that comes out
NaN or infinite raises ``FloatingPointError`` naming the metric (one ``isfinite`` on the
small result) instead of passing the NaN on to a heatmap.
"""

from __future__ import annotations

import numbers
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mechsteer._validate import check_finite, positive_int

Reduce = Literal["mean", "sum", "none"]
Logits = Float[Tensor, "batch pos vocab"] | Float[Tensor, "batch vocab"]


def last_logits(logits: Logits, pos: int | Int[Tensor, " batch"] = -1) -> Float[Tensor, "batch vocab"]:
    """Logits at position ``pos`` (an int, or one position per prompt)."""
    if logits.ndim == 2:
        return logits
    if logits.ndim != 3:
        raise ValueError(f"Expected logits of shape (batch, pos, vocab) or (batch, vocab), got {tuple(logits.shape)}.")
    if isinstance(pos, Tensor):
        return logits[torch.arange(logits.shape[0], device=logits.device), pos.to(logits.device)]
    n = logits.shape[1]
    if isinstance(pos, bool) or not isinstance(pos, numbers.Integral) or not -n <= pos < n:
        raise ValueError(f"pos must be an int in -{n}..{n - 1} (the logits have {n} positions) or a tensor, got {pos!r}.")
    return logits[:, pos]


def _ids(
    ids: Int[Tensor, " batch"] | int, batch: int, device, name: str = "answer", vocab: int | None = None
) -> Int[Tensor, " batch"]:
    """``ids`` as a ``(batch,)`` tensor on ``device``, each in ``0..vocab-1`` when ``vocab`` is given."""
    got = ids
    ids = torch.as_tensor(ids, device=device)
    if isinstance(got, bool) or ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} must be integer token ids, got {ids.dtype} values ({type(got).__name__}).")
    if ids.ndim == 0:
        ids = ids.expand(batch)
    if ids.shape != (batch,):
        raise ValueError(f"Expected {name} ids of shape ({batch},), got {tuple(ids.shape)}.")
    if vocab is not None:
        lo, hi = torch.stack((ids.min(), ids.max())).tolist()  # one read; a bad id indexes silently (< 0) or fails deep
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name} holds token id {lo if lo < 0 else hi}; ids must be in 0..{vocab - 1} (the logits' vocab).")
    return ids


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32, or its own dtype when wider (float64 stays float64): softmax of
    half-precision logits is computed in float32, float64 checks keep their precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _reduce(x: Float[Tensor, " batch"], reduce: Reduce) -> Tensor:
    if reduce == "mean":
        return x.mean()
    if reduce == "sum":
        return x.sum()
    if reduce == "none":
        return x
    raise ValueError(f"reduce must be 'mean', 'sum' or 'none', got {reduce!r}.")


def logit_diff(
    logits: Logits, correct: Int[Tensor, " batch"], wrong: Int[Tensor, " batch"], *, pos=-1, reduce: Reduce = "mean"
) -> Tensor:
    """f_c - f_w at ``pos``: positive when the model prefers the correct answer.

    >>> logits = torch.tensor([[[0.0, 2.0, 1.0]]])
    >>> logit_diff(logits, torch.tensor([1]), torch.tensor([2])).item()
    1.0
    """
    f = last_logits(logits, pos)
    idx = torch.arange(f.shape[0], device=f.device)
    B, V = f.shape
    d = _wide(f[idx, _ids(correct, B, f.device, "correct", V)]) - _wide(f[idx, _ids(wrong, B, f.device, "wrong", V)])
    return check_finite("logit_diff", _reduce(d, reduce))


def answer_prob(logits: Logits, answer: Int[Tensor, " batch"], *, pos=-1, reduce: Reduce = "mean") -> Tensor:
    """softmax(f)_a at ``pos``."""
    f = last_logits(logits, pos)
    p = _wide(f).softmax(-1)
    pa = p[torch.arange(f.shape[0], device=f.device), _ids(answer, f.shape[0], f.device, "answer", f.shape[1])]
    return check_finite("answer_prob", _reduce(pa, reduce))


def kl_div(p_logits: Logits, q_logits: Logits, *, pos=-1, reduce: Reduce = "mean") -> Tensor:
    """KL(softmax(f_p) || softmax(f_q)) over the vocabulary, at ``pos`` (>= 0, 0 iff equal)."""
    lp = _wide(last_logits(p_logits, pos)).log_softmax(-1)
    lq = _wide(last_logits(q_logits, pos)).log_softmax(-1)
    return check_finite("kl_div", _reduce(F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1), reduce))


def answer_rank(logits: Logits, answer: Int[Tensor, " batch"], *, pos=-1) -> Int[Tensor, " batch"]:
    """Rank of the answer among all tokens at ``pos``: 0 when it is the top token."""
    f = last_logits(logits, pos)
    a = f[torch.arange(f.shape[0], device=f.device), _ids(answer, f.shape[0], f.device, "answer", f.shape[1])]
    check_finite("answer_rank (the answer's logit)", a)  # a only, to stay cheap: a NaN elsewhere compares False
    return (f > a[:, None]).sum(-1)


def accuracy(logits: Logits, answer: Int[Tensor, " batch"], *, k: int = 1, pos=-1, reduce: Reduce = "mean") -> Tensor:
    """1.0 where the answer is among the top ``k`` tokens at ``pos``."""
    k = positive_int("k", k)
    return _reduce((answer_rank(logits, answer, pos=pos) < k).float(), reduce)


def normalize(x: Tensor, clean: Tensor | float, corrupted: Tensor | float) -> Tensor:
    """(x - corrupted) / (clean - corrupted): 1 = the clean value, 0 = the corrupted one."""
    denom = clean - corrupted
    if (abs(denom) if not isinstance(denom, Tensor) else denom.abs().max()) < 1e-8:
        raise ValueError(
            f"Cannot normalise: the clean and corrupted metric values are equal ({float(clean):.4g}); "
            "the task does not separate them."
        )
    return check_finite("normalize", (x - corrupted) / denom)


# ---- metrics of a dataset: what attribution methods explain -------------------------------
# A dataset metric is ``metric(logits, ds) -> scalar tensor`` (ds: a ContrastiveDataset with
# ``correct`` and ``wrong`` answer ids); every method's ``metric=`` takes one, or a name of
# ``DATASET_METRICS`` (``resolve_metric``).


def answer_pos(ds, logits: Tensor) -> int | Tensor:
    """Where ``ds``'s answers are read in ``logits``: -1 for full-width prompts, else each
    prompt's own last token (``ds.last``; prompts are right-padded)."""
    pos = getattr(ds, "answer_pos", -1)
    return pos.to(logits.device) if isinstance(pos, Tensor) else pos


def default_metric(logits: Tensor, ds) -> Tensor:
    """Mean logit difference f_c - f_w at each prompt's last token."""
    return logit_diff(logits, ds.correct.to(logits.device), ds.wrong.to(logits.device), pos=answer_pos(ds, logits))


def correct_logit(logits: Tensor, ds) -> Tensor:
    """Mean logit f_c of the correct answer at each prompt's last token."""
    f = last_logits(logits, answer_pos(ds, logits))
    c = _ids(ds.correct.to(f.device), f.shape[0], f.device, "correct", f.shape[1])
    return check_finite("logit", f[torch.arange(f.shape[0], device=f.device), c].mean())


def correct_prob(logits: Tensor, ds) -> Tensor:
    """Mean probability softmax(f)_c of the correct answer at each prompt's last token."""
    return answer_prob(logits, ds.correct.to(logits.device), pos=answer_pos(ds, logits))


def answer_logprob(logits: Float[Tensor, "batch pos vocab"], ds, *, reduce: Reduce = "mean") -> Tensor:
    """Summed log-probability of each prompt's whole answer, teacher forced:
    sum_t log p(a_t | prompt, a_<t), then the mean over prompts (``reduce="none"``: per prompt).

    ``ds`` is a teacher-forced dataset, ``ds.teacher_forced(model, "correct")``: prompt b
    ends with a_1..a_{T-1} and ``ds.target_tokens[b]`` = a_1..a_T, so a_t is read at token
    ``ds.last[b] - T + t`` (t = 1..T). On a dataset of single-token answers it is
    log p(correct) at the last token. Nonlinear in the logits: patching and AtP take it,
    DLA and AttnLRP (linear decompositions) do not (``LINEAR_METRICS``).

    >>> from types import SimpleNamespace as NS
    >>> ds = NS(target_tokens=[[1, 0]], lengths=torch.tensor([3]))
    >>> logits = torch.zeros(1, 3, 2)  # uniform over 2 tokens: log(1/2) per answer token
    >>> round(answer_logprob(logits, ds).item(), 4)
    -1.3863
    """
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        raise ValueError(f"answer_logprob needs logits of shape (batch, pos, vocab), got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}.")
    targets = list(getattr(ds, "target_tokens", None) or [])
    if not targets:
        if getattr(ds, "multi_token", False):
            raise ValueError(f"answer_logprob on dataset {getattr(ds, 'name', '')!r} with multi-token answers needs "
                             "its teacher-forced form: ds.teacher_forced(model, 'correct') (or 'wrong').")
        targets = [[int(c)] for c in ds.correct.tolist()]
    B, T, V = logits.shape
    if len(targets) != B:
        raise ValueError(f"logits hold {B} prompts, the dataset {len(targets)}.")
    lengths = ds.lengths.tolist()
    rows = [b for b, t in enumerate(targets) for _ in t]
    pos = [lengths[b] - len(t) + j for b, t in enumerate(targets) for j in range(len(t))]
    if min(pos) < 0 or max(pos) >= T:
        raise ValueError(f"answer positions {min(pos)}..{max(pos)} fall outside the logits' {T} positions; run the model "
                         "on ds.tokens of this (teacher-forced) dataset.")
    dev = logits.device
    ids = _ids(torch.tensor([a for t in targets for a in t], device=dev), len(rows), dev, "target", V)
    r = torch.tensor(rows, device=dev)
    lp = _wide(logits[r, torch.tensor(pos, device=dev)]).log_softmax(-1)  # (N, vocab), N = answer tokens
    picked = lp[torch.arange(len(rows), device=dev), ids]
    per_prompt = torch.zeros(B, dtype=picked.dtype, device=dev).index_add(0, r, picked)
    return check_finite("answer_logprob", _reduce(per_prompt, reduce))


# name -> dataset metric; "logit_diff" is every method's default
DATASET_METRICS = {"logit_diff": default_metric, "logit": correct_logit, "answer_prob": correct_prob,
                   "answer_logprob": answer_logprob}
# metrics linear in the logits: the ones a linear decomposition (DLA, AttnLRP) can split exactly
LINEAR_METRICS = frozenset({"logit_diff", "logit"})


def resolve_metric(metric, *, name: str = "metric") -> tuple:
    """``(callable or None, name)`` for a method's ``metric=`` argument: None and
    ``"logit_diff"`` give ``(None, "logit_diff")`` (the default, which methods compute per
    prompt on their fast paths); another name of ``DATASET_METRICS`` gives its function; a
    callable ``metric(logits, ds) -> scalar tensor`` is returned with its ``__name__``.

    >>> resolve_metric(None), resolve_metric("logit")[1], resolve_metric(lambda lg, ds: lg.sum())[1]
    ((None, 'logit_diff'), 'logit', 'custom')
    """
    if metric is None:
        return None, "logit_diff"
    if isinstance(metric, str):
        if metric not in DATASET_METRICS:
            raise ValueError(
                f"Unknown {name} {metric!r}; known metric names: {list(DATASET_METRICS)}, "
                "or pass a callable metric(logits, ds) -> scalar tensor."
            )
        return (None if metric == "logit_diff" else DATASET_METRICS[metric]), metric
    if callable(metric):
        label = getattr(metric, "__name__", "custom")
        return metric, "custom" if label == "<lambda>" else label
    raise TypeError(
        f"{name} must be a metric name ({', '.join(DATASET_METRICS)}) or a callable metric(logits, ds) -> "
        f"scalar tensor, got {type(metric).__name__}: {metric!r}."
    )


def per_prompt_metric(logits: Tensor, ds) -> Tensor:
    """Logit difference per prompt at its last token, ``(batch,)``."""
    return logit_diff(logits, ds.correct.to(logits.device), ds.wrong.to(logits.device), pos=answer_pos(ds, logits),
                      reduce="none")


def check_metric_output(value: Tensor, name: str = "metric") -> Tensor:
    """Raise ValueError unless ``value`` is a scalar tensor."""
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"The {name} must return a scalar tensor (e.g. a mean over prompts); it returned {shape}. "
            "Reduce it, e.g. with .mean()."
        )
    return value.reshape(())


def check_metric_values(method: str, clean: Tensor, corrupted: Tensor) -> None:
    """FloatingPointError unless the clean and corrupted metric values are finite: a NaN
    weight or an overflow shows up here, before it turns every score into NaN."""
    check_finite(f"{method}: metric on the clean prompts", clean.detach())
    check_finite(f"{method}: metric on the corrupted prompts", corrupted.detach())


METRICS = {
    "logit_diff": logit_diff,
    "answer_prob": answer_prob,
    "kl_div": kl_div,
    "answer_rank": answer_rank,
    "accuracy": accuracy,
}
