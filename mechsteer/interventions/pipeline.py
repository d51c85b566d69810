"""One steering experiment end to end: task -> intervention -> training -> evaluation -> files.

``steer_task`` builds a contrastive task for the model, splits it into train and test,
trains one intervention (ActivScalar, SteerVec or DynScalar) on the train split by
maximising Psi (Eq. 9) and evaluates it on both splits (Sec. 3.4). The returned
``SteerRun`` holds everything; ``SteerRun.write(out)`` saves the intervention
(safetensors + JSON), the training history, the figures and ``summary.json``. The
``mechsteer steer`` command and the demo report call this.

>>> from mechsteer.tiny import tiny_model
>>> from mechsteer.interventions.train import TrainConfig
>>> run = steer_task(tiny_model("gpt2"), "ccc", "activ_scalar", ["attn_out"], n=8,
...                  config=TrainConfig(epochs=1, progress=False))
>>> s = run.summary()
>>> sorted(s["train"]), s["n_params"] == run.intervention.n_params
(['effectiveness', 'faithfulness', 'minimality'], True)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mechsteer.interventions.base import Intervention
from mechsteer.interventions.evaluate import evaluate_splits
from mechsteer.interventions.scalars import ActivScalar, DynScalar
from mechsteer.interventions.train import TrainConfig, train
from mechsteer.interventions.vectors import SteerVec

METHODS: dict[str, type[Intervention]] = {
    "activ_scalar": ActivScalar,
    "steer_vec": SteerVec,
    "dyn_scalar": DynScalar,
}


def method_class(method: str) -> type[Intervention]:
    """The intervention class called ``method`` (activ_scalar, steer_vec, dyn_scalar)."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    return METHODS[method]


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
            "train": {k: v for k, v in self.metrics["train"].items() if k != "n_params"},
            "test": {k: v for k, v in self.metrics["test"].items() if k != "n_params"},
            "config": dataclasses.asdict(self.config),
            "seconds": self.seconds,
        }

    def figures(self, model) -> dict[str, Any]:
        """Interpretation figures: alphas (ActivScalar), geometry (SteerVec), alphas per
        prompt (DynScalar), and the logit difference as a function of beta (all)."""
        from mechsteer.interventions import plots

        figs: dict[str, Any] = {}
        iv, ds = self.intervention, self.test_ds
        if isinstance(iv, ActivScalar):
            figs["alphas"] = plots.alpha_heatmap(iv, ds)
        elif isinstance(iv, SteerVec):
            figs["geometry"] = plots.steervec_geometry_figure(plots.steervec_geometry(model, iv, ds, progress=False))
        elif isinstance(iv, DynScalar):
            prompts = list(ds.prompts[:2])
            figs["alphas"] = plots.dynscalar_figure(plots.dynscalar_alphas(model, iv, prompts, progress=False))
        figs["beta_sweep"] = plots.beta_sweep_figure(plots.beta_sweep(model, iv, ds, progress=False))
        return figs

    def write(self, out: str | Path, model) -> Path:
        """Write ``out/intervention/``, ``history.csv``, ``figures.html`` and ``summary.json``."""
        from mechsteer import _io
        from mechsteer.interventions.io import save_intervention
        from mechsteer.report import Report, Section

        out = Path(out)
        save_intervention(self.intervention, out / "intervention", model, config=self.config)
        _io.write_text(out / "history.csv", self.history.to_csv(index=False))
        report = Report(f"mechsteer steer: {self.method} on {self.task}")
        report.add(Section("steer", f"{self.method} on {self.task}", figures=list(self.figures(model).values())))
        _io.write_text(out / "figures.html", report.to_html())
        return _io.write_json(out / "summary.json", self.summary())


def steer_task(
    model,
    task: str = "ccc",
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
) -> SteerRun:
    """Build ``task``, train ``method`` at ``sites`` on its train split, evaluate on both."""
    from mechsteer.tasks import make_task

    cls = method_class(method)
    ds = make_task(task, model, n=n, seed=seed, **(task_kwargs or {}))
    if len(ds) < 2:
        raise ValueError(f"Task {task!r} gave {len(ds)} prompts for this model; need at least 2 to split.")
    train_ds, test_ds = ds.split(test_fraction)
    iv = cls.for_model(model, sites=sites, layers=layers, positions=positions, n_pos=ds.n_pos, seed=seed)
    t0 = time.perf_counter()
    history = train(model, iv, train_ds, config)
    metrics = evaluate_splits(model, iv, train_ds, test_ds, batch_size=config.batch_size)
    return SteerRun(task, method, iv, config, history, metrics, train_ds, test_ds, time.perf_counter() - t0)
