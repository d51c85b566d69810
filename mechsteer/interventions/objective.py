"""The three-term objective for learning interventions (seed paper 003, Sec. 3.3).

With f~+ / f~- the intervened logits at beta = +1 / -1, f the clean logits (all at each
prompt's own last token x_n, right-padded prompts included: ``answer_logits``),
c_n / w_n the correct / wrong answer tokens and N prompts:

- Effectiveness (Eq. 6): E_m = -(1/N) sum_n [ max(0, f~+_{w_n} - f~+_{c_n} + m)
  + max(0, f~-_{c_n} - f~-_{w_n} + m) ]: beta = +1 makes c win by margin m, beta = -1
  makes w win. E_0 (m = 0) is the evaluation metric; 0 means every answer flips.
- Faithfulness (Eq. 7): F = -(1/N) sum_n [ KL(softmax(f~+) || softmax(f))
  + KL(softmax(f~-) || softmax(f)) ] over the full vocabulary; other tokens stay put.
- Minimality (Eq. 8, p = 1): M_1 = -||vec(theta)||_1.
- Psi (Eq. 9) = E_m + lambda_F F + lambda_M M_1, to be maximised.

All three terms are <= 0 and 0 is best. The clean logits carry no gradient
(``clean_last_logits`` computes them once under ``torch.no_grad``).

>>> import torch
>>> f = torch.tensor([[2.0, 0.0, 1.0]])
>>> t = objective(f, f.flip(-1), f, torch.tensor([0]), torch.tensor([2]), [torch.ones(3)], margin=1.0)
>>> t.effectiveness.item(), round(t.faithfulness.item(), 3), t.minimality.item()
(-0.0, -0.421, -3.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechsteer._validate import finite_float
from mechsteer.interventions.base import Intervention, plus_minus_batch
from mechsteer.metrics import kl_div, logit_diff


def effectiveness(
    logits_plus: Float[Tensor, "batch vocab"],
    logits_minus: Float[Tensor, "batch vocab"],
    correct: Int[Tensor, " batch"],
    wrong: Int[Tensor, " batch"],
    margin: float = 0.0,
    reduce: str = "mean",  # "mean" | "none" (each prompt's term)
) -> Float[Tensor, ""] | Float[Tensor, " batch"]:
    """E_m (Eq. 6): minus the mean hinge on the logit differences at beta = +1 and -1."""
    if finite_float("margin", margin) < 0:
        raise ValueError(f"margin m must be >= 0, got {margin}.")
    plus = torch.relu(margin - logit_diff(logits_plus, correct, wrong, reduce="none"))  # f~+_w - f~+_c + m
    minus = torch.relu(margin + logit_diff(logits_minus, correct, wrong, reduce="none"))  # f~-_c - f~-_w + m
    return -_reduced(plus + minus, reduce)


def faithfulness(
    logits_plus: Float[Tensor, "batch vocab"],
    logits_minus: Float[Tensor, "batch vocab"],
    clean_logits: Float[Tensor, "batch vocab"],
    reduce: str = "mean",  # "mean" | "none" (each prompt's term)
) -> Float[Tensor, ""] | Float[Tensor, " batch"]:
    """F (Eq. 7): minus the mean of KL(sigma(f~+) || sigma(f)) + KL(sigma(f~-) || sigma(f))."""
    clean = clean_logits.detach()
    return -_reduced(kl_div(logits_plus, clean, reduce="none") + kl_div(logits_minus, clean, reduce="none"), reduce)


def _reduced(per_prompt: Tensor, reduce: str) -> Tensor:
    if reduce not in ("mean", "none"):
        raise ValueError(f"reduce must be 'mean' or 'none', got {reduce!r}.")
    return per_prompt.mean() if reduce == "mean" else per_prompt


def minimality(theta: Intervention | Sequence[Tensor]) -> Float[Tensor, ""]:
    """M_1 (Eq. 8): -||vec(theta)||_1 over an intervention's parameters (or given tensors)."""
    params = list(theta.parameters()) if isinstance(theta, Intervention) else list(theta)
    if not params:
        raise ValueError("minimality got no parameters.")
    return -sum(p.abs().sum() for p in params)


@dataclass(frozen=True)
class ObjectiveTerms:
    """E_m, F, M_1 and Psi = E_m + lambda_F F + lambda_M M_1 (0-d tensors; all <= 0)."""

    psi: Tensor
    effectiveness: Tensor
    faithfulness: Tensor
    minimality: Tensor


def objective(
    logits_plus: Float[Tensor, "batch vocab"],
    logits_minus: Float[Tensor, "batch vocab"],
    clean_logits: Float[Tensor, "batch vocab"],
    correct: Int[Tensor, " batch"],
    wrong: Int[Tensor, " batch"],
    theta: Intervention | Sequence[Tensor],
    *,
    margin: float = 0.0,  # m in Eq. 6
    lambda_f: float = 1.0,  # lambda_F in Eq. 9
    lambda_m: float = 0.0,  # lambda_M in Eq. 9
) -> ObjectiveTerms:
    """Psi (Eq. 9) and its three terms; maximise ``.psi`` (minimise ``-psi``)."""
    if finite_float("lambda_f", lambda_f) < 0 or finite_float("lambda_m", lambda_m) < 0:
        raise ValueError(f"lambda_f and lambda_m (lambda_F, lambda_M) must be >= 0, got {lambda_f}, {lambda_m}.")
    e = effectiveness(logits_plus, logits_minus, correct, wrong, margin)
    f = faithfulness(logits_plus, logits_minus, clean_logits)
    m = minimality(theta)
    return ObjectiveTerms(psi=e + lambda_f * f + lambda_m * m, effectiveness=e, faithfulness=f, minimality=m)


def answer_logits(
    model, tokens: Int[Tensor, "batch pos"], pos: int | Int[Tensor, " batch"] = -1
) -> Float[Tensor, "batch vocab"]:
    """Logits at each prompt's answer position ``pos`` (-1: the last column; a ``(batch,)``
    tensor: each right-padded prompt's own last token, ``ds.answer_pos``). Only the columns
    from the earliest such position on are unembedded."""
    if isinstance(pos, int):
        if pos != -1:
            raise ValueError(f"pos must be -1 or a (batch,) tensor of token indices, got {pos}.")
        return model(tokens, logits_to_keep=1)[:, -1]
    T = tokens.shape[1]
    pos = pos.to(tokens.device).long()
    keep = T - int(pos.min())  # the last `keep` columns hold every answer position
    logits = model(tokens, logits_to_keep=keep)  # (B, keep, V)
    return logits[torch.arange(len(pos), device=logits.device), pos.to(logits.device) - (T - keep)]


@torch.no_grad()
def clean_last_logits(
    model, tokens: Int[Tensor, "batch pos"], pos: int | Int[Tensor, " batch"] = -1
) -> Float[Tensor, "batch vocab"]:
    """Clean logits f(x_n) at each prompt's last token, without gradient (compute once per dataset)."""
    return answer_logits(model, tokens, pos)


def twice(x: Tensor | int | None) -> Tensor | int | None:
    """Rows of ``x`` stacked twice, like the prompts of ``plus_minus_batch`` (ints and None kept)."""
    return torch.cat([x, x]) if isinstance(x, Tensor) else x


def plus_minus_logits(
    model, intervention: Intervention, tokens: Int[Tensor, "batch pos"], strength: float | Tensor = 1.0,
    *, pos: int | Int[Tensor, " batch"] = -1, where: Int[Tensor, "batch n_sel"] | None = None,
) -> tuple[Float[Tensor, "batch vocab"], Float[Tensor, "batch vocab"]]:
    """(f~+, f~-) at each prompt's last token (``pos``) from ONE forward pass of the prompts
    stacked twice, at beta = +strength and -strength (a 0-d tensor ``strength`` carries its
    gradient); ``where``: the prompts' token indices to bind (``Intervention.token_index``)."""
    both, beta = plus_minus_batch(tokens)
    with intervention.apply(model, beta * strength, where=twice(where)):
        logits = answer_logits(model, both, twice(pos))  # (2B, V)
    b = tokens.shape[0]
    return logits[:b], logits[b:]
