"""Training a learnable intervention by maximising Psi (seed paper 003, Eq. 9 and App. A.1).

The intervention's parameters theta are fitted with Adam to maximise

    Psi(theta) = E_m(theta) + lambda_F F(theta) + lambda_M M_1(theta),

i.e. by minimising -Psi over shuffled mini-batches of a ``ContrastiveDataset``. Each step
runs the batch at beta = +1 and beta = -1 as ONE forward pass (``plus_minus_logits``), and
compares against the clean logits f, computed once for the whole dataset without gradient.
All logits are read at each prompt's own last token: datasets of mixed prompt lengths
(right-padded) train as they are, each batch binding its prompts' token indices to the
intervention (``Intervention.token_index`` / ``bind``; ``for_dataset`` builds
ActivScalar and SteerVec on end-relative or named slots for such data). Only theta trains: the gradient is taken with ``torch.autograd.grad``
w.r.t. the intervention's parameters, so the model's weights and their ``.grad`` are never
touched. Hooks are scoped (``mechsteer.sites.hooked``), so none outlive a step.

Defaults follow App. A.1: 25 epochs of Adam, learning rate 1e-3 for activation scalars
(ActivScalar, DynScalar) and 1e-4 for steering vectors (SteerVec). The paper gives no
single default for m, lambda_F, lambda_M (it grid-searches {0, 1, 10, 100} each, Fig. 2);
here m = 1, lambda_F = 1, lambda_M = 0.

A NaN or infinite loss (or parameter) stops training with a ``FloatingPointError`` that
names the epoch and step, rather than silently training on garbage.

>>> from mechsteer.interventions import ActivScalar
>>> from mechsteer.tasks import ccc
>>> from mechsteer.tiny import tiny_model
>>> model = tiny_model("gpt2")
>>> ds = ccc(model, n=4)
>>> iv = ActivScalar.for_model(model, sites=["attn_out"], n_pos=ds.n_pos)
>>> hist = train(model, iv, ds, TrainConfig(epochs=2, batch_size=2, progress=False))
>>> list(hist.columns), len(hist)
(['epoch', 'step', 'psi', 'effectiveness', 'faithfulness', 'minimality'], 4)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechsteer._validate import check_finite, finite_float, positive_int
from mechsteer.interventions.base import Intervention
from mechsteer.interventions.objective import (
    clean_last_logits,
    objective,
    plus_minus_logits,
)
from mechsteer.interventions.vectors import SteerVec
from mechsteer.runs import float32_logits
from mechsteer.tasks.base import ContrastiveDataset

HISTORY_COLUMNS = ["epoch", "step", "psi", "effectiveness", "faithfulness", "minimality"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of ``train`` (build by keyword)."""

    epochs: int = 25  # App. A.1: 25 epochs of Adam
    lr: float | None = None  # None: 1e-3 for scalars, 1e-4 for SteerVec (App. A.1)
    batch_size: int = 32  # prompts per forward (= per Adam step; each runs at beta = +1 and -1 in it)
    margin: float = 1.0  # m in Eq. 6; the paper gives no single default (grid {0,1,10,100})
    lambda_f: float = 1.0  # lambda_F in Eq. 9; no single default in the paper
    lambda_m: float = 0.0  # lambda_M in Eq. 9; no single default in the paper
    seed: int = 0  # seeds the mini-batch shuffling
    progress: bool = True  # tqdm bar with E_m, F, M_1 live

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        for name in ("epochs", "batch_size"):
            set_(name, positive_int(name, getattr(self, name)))  # bools refused (epochs=True)
        if self.lr is not None:
            set_("lr", finite_float("lr", self.lr))
            if self.lr <= 0:
                raise ValueError(f"lr must be a finite number > 0 (or None for the App. A.1 default), got {self.lr}.")
        for name in ("margin", "lambda_f", "lambda_m"):
            set_(name, finite_float(name, getattr(self, name)))
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r} ({type(self.seed).__name__}).")

    def learning_rate(self, intervention: Intervention) -> float:
        """``lr``, or the App. A.1 default for this kind of intervention."""
        if self.lr is not None:
            return self.lr
        return 1e-4 if isinstance(intervention, SteerVec) else 1e-3


def check_inputs(model, intervention, ds) -> None:
    """TypeError/ValueError unless ``intervention`` is an Intervention built for ``model`` and
    ``ds`` a ContrastiveDataset whose ids are all in the model's vocabulary (the dataset
    checks its own shapes and dtypes when built; ``validate_for`` the vocabulary)."""
    if not isinstance(intervention, Intervention):
        raise TypeError(f"intervention must be a mechsteer Intervention, got {type(intervention).__name__}.")
    if not isinstance(ds, ContrastiveDataset):
        raise TypeError(f"ds must be a ContrastiveDataset (mechsteer.tasks), got {type(ds).__name__}.")
    ds.validate_for(model)
    intervention.check_model(model)


def rows(x: Tensor | int | None, idx) -> Tensor | int | None:
    """``x[idx]`` for a per-prompt tensor; an int (-1: every prompt's last column) or None as is."""
    return x[idx] if isinstance(x, Tensor) else x


def batch_view(tokens: Int[Tensor, "batch pos"], pos, where, idx):
    """The prompts ``idx``: their tokens cut to the longest one's length (pad columns no
    prompt of the batch needs are dropped), answer positions and bound token indices."""
    p, w = rows(pos, idx), rows(where, idx)
    t = tokens[idx]
    if isinstance(p, Tensor):
        t = t[:, : int(p.max()) + 1]
    return t, p, w


def dataset_tensors(model, intervention: Intervention, ds):
    """(tokens, correct, wrong, pos, where) of ``ds`` on the model's device: ``pos`` each
    prompt's answer position (-1 when none is padded), ``where`` the intervention's
    per-prompt token indices (None when an unbound forward is exact)."""
    device = next(model.parameters()).device
    tokens, correct, wrong = (t.to(device) for t in (ds.tokens, ds.correct, ds.wrong))
    pos = ds.answer_pos
    pos = pos.to(device) if isinstance(pos, Tensor) else pos
    where = intervention.token_index(ds)
    return tokens, correct, wrong, pos, (where.to(device) if where is not None else None)


@torch.no_grad()
def batched_clean_logits(
    model, tokens: Int[Tensor, "batch pos"], batch_size: int = 32, pos: int | Int[Tensor, " batch"] = -1
) -> Float[Tensor, "batch vocab"]:
    """Clean logits f at each prompt's last token (``pos``) for all prompts, in batches, without gradient."""
    batch_size = positive_int("batch_size", batch_size)
    out = []
    for i in range(0, len(tokens), batch_size):
        t, p, _ = batch_view(tokens, pos, None, slice(i, i + batch_size))
        out.append(clean_last_logits(model, t, p))
    return torch.cat(out)


def train(model, intervention: Intervention, ds, config: TrainConfig = TrainConfig()) -> pd.DataFrame:
    """Fit theta with Adam to maximise Psi = E_m + lambda_F F + lambda_M M_1 (Eq. 9).

    Returns the history, one row per step: epoch, step, psi, effectiveness (E_m),
    faithfulness (F), minimality (M_1), each on that step's mini-batch. On a bf16/fp16
    model the logits (and so the hinge and the KL) are computed in float32
    (``runs.float32_logits``); theta and Adam's state are float32 throughout.
    """
    with float32_logits(model):
        return _train(model, intervention, ds, config)


def _train(model, intervention: Intervention, ds, config: TrainConfig) -> pd.DataFrame:
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig (build one by keyword), got {type(config).__name__}.")
    check_inputs(model, intervention, ds)
    params = [p for p in intervention.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The intervention has no trainable parameters (all have requires_grad=False).")
    device = next(model.parameters()).device
    intervention.to(device)
    tokens, correct, wrong, pos, where = dataset_tensors(model, intervention, ds)
    n = tokens.shape[0]
    clean = batched_clean_logits(model, tokens, config.batch_size, pos)  # (N, V), once, no grad
    check_finite("train: the model's clean last-position logits", clean)
    for site, p in intervention.params.items():
        check_finite(f"train: the intervention's initial parameters at site {site!r}", p.detach())
    opt = torch.optim.Adam(params, lr=config.learning_rate(intervention))
    gen = torch.Generator().manual_seed(config.seed)
    n_batches = math.ceil(n / config.batch_size)
    rows = []
    step = 0
    with tqdm(
        total=config.epochs * n_batches, desc=f"train {type(intervention).__name__}", disable=not config.progress
    ) as bar:
        for epoch in range(config.epochs):
            order = torch.randperm(n, generator=gen).to(device)
            for i in range(0, n, config.batch_size):
                idx = order[i : i + config.batch_size]
                with torch.enable_grad():
                    t, p, w = batch_view(tokens, pos, where, idx)
                    f_plus, f_minus = plus_minus_logits(model, intervention, t, pos=p, where=w)
                    try:  # the metrics refuse NaN logits; say where training got them
                        terms = objective(
                            f_plus, f_minus, clean[idx], correct[idx], wrong[idx], intervention,
                            margin=config.margin, lambda_f=config.lambda_f, lambda_m=config.lambda_m,
                        )
                    except FloatingPointError as err:
                        raise FloatingPointError(f"At epoch {epoch}, step {step}: {err} Lower lr.") from None
                    loss = -terms.psi
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"Loss -Psi is {loss.item()} at epoch {epoch}, step {step} (E_m="
                            f"{terms.effectiveness.item()}, F={terms.faithfulness.item()}, "
                            f"M_1={terms.minimality.item()}); lower lr or check the inputs."
                        )
                    grads = torch.autograd.grad(loss, params)
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
                opt.zero_grad(set_to_none=True)
                if not all(torch.isfinite(p).all() for p in params):
                    raise FloatingPointError(
                        f"Intervention parameters became NaN or infinite at epoch {epoch}, step {step}; lower lr."
                    )
                row = {
                    "epoch": epoch,
                    "step": step,
                    "psi": terms.psi.item(),
                    "effectiveness": terms.effectiveness.item(),
                    "faithfulness": terms.faithfulness.item(),
                    "minimality": terms.minimality.item(),
                }
                rows.append(row)
                bar.set_postfix(E=f"{row['effectiveness']:.3g}", F=f"{row['faithfulness']:.3g}", M=f"{row['minimality']:.3g}")
                bar.update()
                step += 1
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)
