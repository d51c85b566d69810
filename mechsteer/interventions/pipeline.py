"""One steering experiment end to end: task -> intervention -> training -> evaluation -> files.

``steer_task`` builds a contrastive task for the model (prompts of one length, or of mixed
lengths: then ActivScalar and SteerVec hold one parameter per named or end-relative slot,
``Intervention.for_dataset``), splits it into train and test,
trains one intervention (ActivScalar, SteerVec or DynScalar, by its name in
``interventions.kinds.KINDS``) on the train split by maximising Psi (Eq. 9), evaluates it
on both splits (Sec. 3.4) and computes what its figures draw: the beta sweep on the test
prompts (and ``flip_beta``), SteerVec's geometry, DynScalar's alphas on two test prompts.
The returned ``SteerRun`` holds all of it as data; ``SteerRun.write(out)`` saves the
intervention (safetensors + JSON), the training history, ``figures.html`` and
``summary.json`` without running the model again. The ``mechsteer steer`` command and the
demo report call this.

>>> from mechsteer.tiny import tiny_model
>>> from mechsteer.interventions.train import TrainConfig
>>> run = steer_task(tiny_model("gpt2"), "ccc", "activ_scalar", ["attn_out"], n=8,
...                  config=TrainConfig(epochs=1, progress=False))
>>> s = run.summary()
>>> sorted(s["train"]), s["n_params"] == run.intervention.n_params, list(run.figures())
(['effectiveness', 'faithfulness', 'minimality'], True, ['alphas', 'beta_sweep'])
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mechsteer import _io
from mechsteer.interventions.base import DEFAULT_INIT_STD, Intervention
from mechsteer.interventions.evaluate import evaluate_splits
from mechsteer.interventions.interpret import beta_sweep, dynscalar_alphas, flip_beta, steervec_geometry
from mechsteer.interventions.io import model_record, save_intervention
from mechsteer.interventions.kinds import KINDS, kind_class
from mechsteer.interventions.plots import alpha_heatmap, beta_sweep_figure, dynscalar_figure, steervec_geometry_figure
from mechsteer.interventions.scalars import ActivScalar, DynScalar
from mechsteer.interventions.train import TrainConfig, train
from mechsteer.interventions.vectors import SteerVec
from mechsteer.plots import figures_page
from mechsteer.tasks.base import ContrastiveDataset

METHODS = KINDS  # the one registry, under the name the CLI and demo import (prefer kinds.KINDS)
# lambda_M for a sparse, readable alpha heatmap (paper 003 Fig. 3), per kind. Measured on
# SmolLM2 CCC (attn_out + mlp_out, 1080 alphas; 10 epochs, batch 8, lr 1e-2, m = 1,
# lambda_F = 1): lambda_M = 0 / 0.03 / 0.1 / 0.3 / 1 leave 971 / 347 / 137 / 52 / 8 alphas
# above 0.01 at train E_0 = 0.00 / 0.00 / -0.06 / -0.22 / -1.10 (test E_0 -0.08 / -0.29 /
# -0.70 / -0.98 / -1.84). 0.1 is the sparsest point of that Pareto front whose
# intervention still flips (nearly) every training prompt. M_1 sums |theta|, so the
# value is tied to this parameter count; SteerVec (d_model per location) and DynScalar
# keep 0, as an L1 pull of this size on each of their coordinates would erase them.
SPARSE_LAMBDA_M: dict[str, float] = {"activ_scalar": 0.1, "steer_vec": 0.0, "dyn_scalar": 0.0}


@dataclass
class SteerRun:
    """A trained intervention with its data, history and Sec. 3.4 metrics."""

    task: str
    method: str
    intervention: Intervention
    config: TrainConfig
    history: pd.DataFrame
    metrics: dict[str, dict[str, float | int]]  # {"train": {...}, "test": {...}}
    train_ds: Any
    test_ds: Any
    seconds: float
    beta_sweep: pd.DataFrame  # interpret.beta_sweep on the test prompts (default betas)
    geometry: pd.DataFrame | None = None  # SteerVec: interpret.steervec_geometry on the test prompts
    alphas: list[pd.DataFrame] | None = None  # DynScalar: interpret.dynscalar_alphas on two test prompts
    model_record: dict[str, Any] | None = None  # io.model_record(model): the save's fingerprint

    @property
    def flip_beta(self) -> float:
        """The beta where the test prompts' mean logit difference crosses zero (NaN if never)."""
        return flip_beta(self.beta_sweep)

    def summary(self) -> dict[str, Any]:
        """``n_params``, ``train`` / ``test`` with effectiveness (E_0), faithfulness (F),
        minimality (count of |theta| > 0.01) [and n_locations for SteerVec], and the setup."""
        iv = self.intervention
        return {
            "task": self.task,
            "method": self.method,
            "sites": list(iv.sites),
            "layers": list(iv.layers),
            "positions": iv.positions if isinstance(iv.positions, str) else list(iv.positions),
            "n_params": iv.n_params,
            "n_train": len(self.train_ds),
            "n_test": len(self.test_ds),
            "n_pos": self.train_ds.n_pos,
            "slots": list(iv.slots) if iv.slots is not None else None,
            "train": {k: v for k, v in self.metrics["train"].items() if k != "n_params"},
            "test": {k: v for k, v in self.metrics["test"].items() if k != "n_params"},
            "config": dataclasses.asdict(self.config),
            "seconds": self.seconds,
        }

    def figures(self, model=None) -> dict[str, Any]:
        """Interpretation figures, drawn from the stored data (``model`` is ignored): alphas
        (ActivScalar, DynScalar), geometry (SteerVec) and the logit difference vs beta (all)."""
        figs: dict[str, Any] = {}
        if isinstance(self.intervention, ActivScalar):
            figs["alphas"] = alpha_heatmap(self.intervention, self.test_ds)
        elif self.geometry is not None:
            figs["geometry"] = steervec_geometry_figure(self.geometry)
        elif self.alphas is not None:
            figs["alphas"] = dynscalar_figure(self.alphas)
        figs["beta_sweep"] = beta_sweep_figure(self.beta_sweep)
        return figs

    def write(self, out: str | Path, model=None) -> Path:
        """Write ``out/intervention/``, ``history.csv``, ``figures.html`` and ``summary.json``;
        return the path of ``summary.json``. ``model`` is optional: the run holds the model's
        fingerprint for the save (a given model is checked against the intervention)."""
        out = Path(out)
        save_intervention(self.intervention, out / "intervention", model, config=self.config,
                          model_record=None if model is not None else self.model_record)
        _io.write_text(out / "history.csv", self.history.to_csv(index=False))
        title = f"mechsteer steer: {self.method} on {self.task}"
        _io.write_text(out / "figures.html", figures_page(title, list(self.figures().values())))
        return _io.write_json(out / "summary.json", self.summary())


def steer_task(
    model,
    task: str | ContrastiveDataset = "ccc",
    method: str = "activ_scalar",
    sites: Sequence[str] = ("attn_out", "mlp_out"),
    *,
    n: int | None = 64,
    test_fraction: float = 0.25,
    layers: Sequence[int] | None = None,
    positions: str | Sequence[int] = "all",
    config: TrainConfig = TrainConfig(),
    seed: int = 0,
    task_kwargs: dict[str, Any] | None = None,
    init_std: float | str = DEFAULT_INIT_STD,  # App. A.1's N(0, 1e-5): std 1e-5, or "var" (std sqrt(1e-5))
) -> SteerRun:
    """Build ``task`` (a name, or a ContrastiveDataset used as given: ``n`` and
    ``task_kwargs`` are then ignored), train ``method`` at ``sites`` on its train split,
    evaluate on both."""
    from mechsteer.tasks import make_task

    cls = kind_class(method)
    if isinstance(task, ContrastiveDataset):  # the user's own prompts (any lengths)
        ds, task = task, task.name
    else:
        ds = make_task(task, model, n=n, seed=seed, **(task_kwargs or {}))
    if len(ds) < 2:
        raise ValueError(f"Task {task!r} gave {len(ds)} prompts for this model; need at least 2 to split.")
    train_ds, test_ds = ds.split(test_fraction)
    iv = cls.for_dataset(model, ds, sites=sites, layers=layers, positions=positions, seed=seed,
                         init_std=init_std)  # slots on mixed lengths
    t0 = time.perf_counter()
    history = train(model, iv, train_ds, config)
    metrics = evaluate_splits(model, iv, train_ds, test_ds, batch_size=config.batch_size)
    seconds = time.perf_counter() - t0
    figure_data: dict[str, Any] = {"beta_sweep": beta_sweep(model, iv, test_ds, progress=False)}
    if isinstance(iv, SteerVec):
        figure_data["geometry"] = steervec_geometry(model, iv, test_ds, progress=False)
    elif isinstance(iv, DynScalar):
        figure_data["alphas"] = dynscalar_alphas(model, iv, list(test_ds.prompts[:2]), progress=False)
    return SteerRun(task, method, iv, config, history, metrics, train_ds, test_ds, seconds,
                    model_record=model_record(model), **figure_data)
