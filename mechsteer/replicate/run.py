"""``replicate``: run every row of the replication report on one model.

Steering rows (paper 003) train on CCC; function-vector rows (papers 000, 004) read one
``run_fv`` with the papers' protocol (``FVConfig.paper``), whose Table 1 times every
head-scoring method on the same prompts at batch 1 and batched (``fv.timing.table1``).
``ReplicationRun.markdown()`` is REPLICATION.md's body;
``write(out)`` also saves ``claims.csv``, ``table1.csv``, ``fv_accuracy.csv`` and
``summary.json``.
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mechsteer import _io
from mechsteer.replicate import notes
from mechsteer.replicate.claims import Claim, ReplicateConfig


def _cell(x) -> str:
    if isinstance(x, float) and x != x:  # a missing cell of a table behind the rows (e.g. the baseline's method)
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x).replace("|", "/").replace("\n", " ")


def md_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table of ``df`` (floats to 3 significant digits); pandas'
    ``to_markdown`` would add the tabulate dependency for this one use."""
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    return "\n".join([head, rule] + ["| " + " | ".join(_cell(x) for x in row) + " |" for row in df.itertuples(index=False)])


@dataclass
class ReplicationRun:
    """The claims (one row each) and the tables behind them."""

    claims: list[Claim]
    tables: dict[str, pd.DataFrame]
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """One row per claim: paper, where, claim, paper_value, measure, value, lo, hi, n, verdict, why."""
        return pd.DataFrame([c.row() for c in self.claims])

    def counts(self) -> dict[str, int]:
        return self.table()["verdict"].value_counts().to_dict()

    def markdown(self) -> str:
        """The report: one table row per claim, then the tables behind the rows."""
        m = self.meta
        lines = [f"Model: `{m.get('model')}`. Command: `{m.get('command')}`. Run on {m.get('date')} "
                 f"({m.get('machine')}), {m.get('seconds', 0):.0f} s. Verdicts: "
                 + ", ".join(f"{v} {k}" for k, v in self.counts().items()) + ".", "",
                 "Each row: a claim of paper 000 (Fast & Faithful Function Vectors), 003 (Activation Scaling) or 004 "
                 "(Function Vectors in LLMs), the paper's number, what mechsteer measures on this model, the value "
                 "with its 95% interval (Wilson for accuracies, bootstrap over prompts otherwise, paired when two "
                 "methods meet the same prompts; a single number is exact or one timed run), the sample size, and "
                 "the verdict with the rule that gave it. The code of every row: `mechsteer/replicate/`.", "",
                 "| # | paper | where | claim | paper's number | mechsteer measures | value [95% interval] | n | verdict |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for i, c in enumerate(self.claims, 1):
            val = f"{c.value:.3g}" if c.lo == c.hi == c.value else f"{c.value:.3g} [{c.lo:.3g}, {c.hi:.3g}]"
            cells = [str(i), c.paper, c.where, c.claim, c.paper_value, c.measure, val, str(c.n), f"**{c.verdict}**: {c.why}"]
            lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
        lines += ["", notes.markdown(), "## Tables behind the rows"]
        for name, df in self.tables.items():
            lines += ["", f"### {name}", "", md_table(df)]
        return "\n".join(lines) + "\n"

    @classmethod
    def read(cls, out: str | Path) -> "ReplicationRun":
        """The run that ``write(out)`` saved (claims, tables, meta), e.g. to render it again."""
        out = Path(out)
        saved = json.loads((out / "summary.json").read_text())
        tables = {name: pd.read_csv(out / f"{name.lower().replace(' ', '_')}.csv") for name in saved.get("tables", [])}
        return cls([Claim(**c) for c in saved["claims"]], tables, saved["meta"])

    def write(self, out: str | Path) -> Path:
        out = Path(out)
        _io.write_text(out / "claims.csv", self.table().to_csv(index=False))
        for name, df in self.tables.items():
            _io.write_text(out / f"{name.lower().replace(' ', '_')}.csv", df.to_csv(index=False))
        _io.write_text(out / "REPLICATION.md", "# Replication report\n\n" + self.markdown())
        return _io.write_json(out / "summary.json", {"meta": self.meta, "claims": [c.row() for c in self.claims],
                                                     "tables": list(self.tables)})


def _fv_config(model, cfg: ReplicateConfig):
    """``FVConfig.paper``: Todd et al.'s ICL protocol, >= 50 held-out test items per task."""
    from mechsteer.fv.pipeline import PAPER_TASKS, FVConfig

    if cfg.fv_quick:
        return FVConfig.paper(tasks=cfg.fv_tasks or ("antonym", "capitalize"), n_shots=2, k=3, n_train=6, n_queries=2,
                              n_cie=2, n_val=2, n_test=4, filter=False, lrp_max_rank=10**6, sweep_step=1, naive_samples=2,
                              seed=cfg.seed, progress=False)
    return FVConfig.paper(tasks=cfg.fv_tasks or PAPER_TASKS, seed=cfg.seed, progress=cfg.progress)


def replicate(model, config: ReplicateConfig = ReplicateConfig(), *, command: str = "",
              log: Callable[[str], None] = lambda msg: None) -> ReplicationRun:
    """Every claim row on ``model`` (see the package docstring); ``log`` gets progress lines."""
    from mechsteer.fv.pipeline import run_fv
    from mechsteer.replicate import fv_claims, scalar_claims, steering

    cfg, t0 = config, time.perf_counter()

    def step(msg: str) -> None:
        log(f"{time.perf_counter() - t0:6.0f}s  {msg}")

    claims: list[Claim] = []
    tables: dict[str, pd.DataFrame] = {}
    step("paper 003: training ActivScalar, SteerVec, DynScalar on CCC")
    s = steering.train_all(model, cfg)
    step("paper 003: Table 2, beta sign, DynScalar lengths")
    claims += steering.table2_rows(model, s) + steering.template_rows(model, s)
    claims += [steering.beta_sign_row(model, s), steering.dynscalar_length_row(model, s)]
    step("paper 003: Fig. 4 refits")
    claims += steering.refit_rows(model, s)
    step("paper 003: Sec. 6.1 attribution scores as scalars, Fig. 3 sparse alphas, Fig. 7 heads vs DLA")
    claims += scalar_claims.sec61_rows(model, s) + [scalar_claims.sparse_row(model, s), scalar_claims.heads_vs_dla_row(model, s)]
    step("papers 000/004: function vectors")
    run = run_fv(model, _fv_config(model, cfg))
    tables["FV accuracy"] = run.accuracy.drop(columns=[c for c in ("layer",) if c in run.accuracy])
    claims += fv_claims.fv_rows(model, run)
    tables["Table 1"] = run.extra["table1"].drop(columns=["procedure"])  # the run's own timing: fv.timing.table1
    claims += fv_claims.table1_rows(run.extra["table1"])
    step("paper 000: Table 2 generation")
    claims.append(fv_claims.generation_row(model, run, n_prompts=2 if cfg.fv_quick else 10))
    seconds = time.perf_counter() - t0
    meta = {"model": model.cfg.model_name, "command": command, "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, torch {__import__('torch').__version__}, "
                       f"{__import__('torch').get_num_threads()} threads",
            "seconds": seconds, "config": asdict(cfg)}
    step("done")
    return ReplicationRun(claims, tables, meta)
