"""The demo report: every part of mechsteer on one model, at two sizes.

``run_demo(model, DemoConfig())`` builds the report that ``mechsteer demo`` writes: the
model, the tasks (CCC and IOI), the four attribution methods side by side, activation
scaling (ActivScalar vs SteerVec vs DynScalar on CCC) and function vectors (three tasks,
heads by AIE, AttnLRP and AtP, injected as FV and DFV).

- ``DemoConfig()`` (``mechsteer demo``): every method and every section, on small
  samples, so that a newcomer's first run ends in under 10 minutes on 2 CPU cores
  (BENCHMARKS.md has the measured time). Its numbers are a smoke test of the pipeline,
  not a replication: 4 prompts per attribution grid, 10 training epochs; function vectors
  by Todd et al.'s ICL protocol on the three tasks where they work on SmolLM2, at 20 test
  items per task.
- ``DemoConfig.full()`` (``mechsteer demo --full``): the sizes of the papers' protocols
  where this model allows them (16 attribution prompts, 25 epochs, ``FVConfig.paper``:
  10-shot extraction, 50 held-out test items per task, every other FV layer swept) and the replication section (``mechsteer.replicate``: each claim of the
  papers beside mechsteer's number, as in REPLICATION.md); about an hour on 2 CPU cores.

Each section states its own sizes in the report, so a reader knows which run they see.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from mechsteer._validate import nonneg_int, positive_int

# = fv.pipeline.PAPER_TASKS (kept literal: the CLI imports this module without torch): the three
# tasks where FV and DFV raise SmolLM2's zero-shot top-1 with the 95% interval above zero.
DEMO_FV_TASKS = ("antonym", "capitalize_first_letter", "present-past")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo's sections (the default is the quick run; ``full()`` the large one)."""

    n: int = 32  # prompts per task in the task section
    attribution_n: int = 4  # prompts per task for the four attribution methods (0 skips the section)
    steer_n: int = 32  # CCC prompts for activation scaling, split 3:1 into train and test (0 skips)
    steer_epochs: int = 10  # Adam epochs per method (batch 8)
    fv_tasks: tuple[str, ...] = DEMO_FV_TASKS  # function-vector tasks (empty skips the section)
    # overrides of FVConfig.paper (Todd et al.'s ICL protocol): fewer prompts and layers than the paper's preset
    fv: dict[str, Any] = field(default_factory=lambda: dict(n_queries=10, n_cie=4, n_val=6, n_test=20, sweep_step=3,
                                                            naive_samples=4))
    seed: int = 0
    size: str = "quick"  # a label for the report: "quick" or "full"
    replicate: bool = False  # add the replication section (``mechsteer.replicate``; about 30 min on SmolLM2)

    def __post_init__(self) -> None:
        positive_int("n", self.n)
        for name in ("attribution_n", "steer_n"):
            nonneg_int(name, getattr(self, name))
        positive_int("steer_epochs", self.steer_epochs)
        nonneg_int("seed", self.seed)

    @classmethod
    def full(cls, **overrides: Any) -> "DemoConfig":
        """The paper-sized run (see the module docstring)."""
        fv: dict[str, Any] = {}  # FVConfig.paper as it is: 50 test items per task, every other layer
        return replace(cls(attribution_n=16, steer_n=48, steer_epochs=25, fv=fv, size="full", replicate=True), **overrides)


def run_demo(model, config: DemoConfig = DemoConfig(), log: Callable[[str], None] = print):
    """The demo report (a ``mechsteer.report.Report``; ``.write(out)`` writes it)."""
    from mechsteer.report import Report, model_section, task_section
    from mechsteer.tasks import make_task

    cfg, t0 = config, time.perf_counter()

    def step(msg: str) -> None:
        log(f"{time.perf_counter() - t0:6.0f}s  {msg}")

    report = Report(f"mechsteer demo ({cfg.size}): {model.cfg.model_name}", meta={"demo": asdict(cfg)})
    step("model section")
    report.add(model_section(model))
    step("task section")
    datasets = [make_task(name, model, n=cfg.n, seed=cfg.seed) for name in ("ccc", "ioi")]
    report.add(task_section(model, datasets))
    if cfg.attribution_n > 0:
        from mechsteer.attribution.suite import run_suite
        from mechsteer.report import attribution_section

        step(f"attribution section ({cfg.attribution_n} prompts per task)")
        suites = [run_suite(model, ds.subset(slice(0, min(cfg.attribution_n, len(ds)))))
                  for ds in datasets]
        report.add(attribution_section(suites))
    if cfg.steer_n > 0:
        from mechsteer.interventions.kinds import KINDS
        from mechsteer.interventions.pipeline import SPARSE_LAMBDA_M, steer_task
        from mechsteer.interventions.train import TrainConfig
        from mechsteer.report import steering_section

        runs = []
        for method in KINDS:
            step(f"steering section: training {method} ({cfg.steer_epochs} epochs)")
            # App. A.1's lr (1e-3 scalars, 1e-4 vectors) is for single-prompt training; with
            # batches of 8 prompts the demo uses 10x that to move in few steps.
            lr = 1e-3 if method == "steer_vec" else 1e-2
            # ActivScalar with lambda_M = 0.1 from SmolLM2's CCC Pareto sweep: 137 of 1080 alphas
            # non-negligible, the sparse, readable picture of paper 003 Fig. 3 (0 for the others).
            tc = TrainConfig(epochs=cfg.steer_epochs, batch_size=8, lr=lr, lambda_m=SPARSE_LAMBDA_M[method], progress=False)
            runs.append(steer_task(model, "ccc", method, n=cfg.steer_n, config=tc, seed=cfg.seed))
        report.add(steering_section(runs))
    if cfg.fv_tasks:
        from mechsteer.fv.pipeline import FVConfig, run_fv
        from mechsteer.report import fv_section

        step(f"function-vector section on {','.join(cfg.fv_tasks)}")
        tiny = model.cfg.model_name.startswith("tiny")  # random weights answer nothing: skip the filter
        fv = {"k": min(10, model.cfg.n_layers * model.cfg.n_heads // 2), **cfg.fv}
        if tiny:
            fv.update(filter=False, lrp_max_rank=10**6, n_shots=3, n_train=8)
        fc = FVConfig.paper(tasks=tuple(cfg.fv_tasks), seed=cfg.seed, progress=False, **fv)
        report.add(fv_section(run_fv(model, fc)))
    if cfg.replicate:
        from mechsteer.replicate import ReplicateConfig, replicate
        from mechsteer.report import replication_section

        step("replication section")
        tiny = model.cfg.model_name.startswith("tiny")
        rc = ReplicateConfig.quick(seed=cfg.seed) if tiny else ReplicateConfig(seed=cfg.seed, progress=False)
        report.add(replication_section(replicate(model, rc, command="mechsteer demo --full")))
    report.meta["seconds"] = round(time.perf_counter() - t0, 1)
    step("done")
    return report
