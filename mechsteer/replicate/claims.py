"""One row of the replication report, and the sizes a replication run uses.

A ``Claim`` states one claim of papers 000, 003 or 004 in one line, the paper's figure or
number, and mechsteer's measurement of it: the value, its 95% interval (``lo``, ``hi``;
binomial for accuracies, bootstrap over prompts otherwise, see ``replicate.stats``), the
sample size ``n`` and a verdict with its reason. A row never holds a NaN: a measurement
that cannot be made is a ``"not testable at this scale"`` verdict with a reason.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from mechsteer._validate import nonneg_int, positive_int

VERDICTS = ("reproduced", "not reproduced", "not testable at this scale")


@dataclass(frozen=True)
class Claim:
    """One claim beside what mechsteer measures (see the module docstring)."""

    paper: str  # "000", "003" or "004"
    where: str  # "Table 2", "Fig. 4", "Sec. 6.1", ...
    claim: str  # the claim, in one line
    paper_value: str  # the paper's figure or number, as text
    measure: str  # what ``value`` is, with its unit
    value: float
    lo: float
    hi: float
    n: int  # sample size behind the interval (prompts, items, seed pairs, heads)
    verdict: str  # one of VERDICTS
    why: str  # the rule that gave the verdict, or why it cannot be tested

    def __post_init__(self):
        bad = [k for k in ("value", "lo", "hi") if not math.isfinite(getattr(self, k))]
        if bad:
            raise ValueError(f"Claim {self.claim!r}: {bad} not finite; a row must hold numbers "
                             "(use verdict 'not testable at this scale' with a reason instead).")
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}.")
        for k in ("value", "lo", "hi"):
            object.__setattr__(self, k, float(getattr(self, k)))

    def row(self) -> dict:
        return asdict(self)


def verdict(ok: bool, testable: bool = True) -> str:
    return VERDICTS[2] if not testable else VERDICTS[0] if ok else VERDICTS[1]


@dataclass(frozen=True)
class ReplicateConfig:
    """Sizes of ``replicate``: the default is the run behind REPLICATION.md on the
    embedded model; ``quick()`` runs every row on a tiny model in seconds (numbers
    meaningless, the pipeline exercised)."""

    ccc_n: int = 96  # CCC prompts for the steering rows (SmolLM2 keeps 78), split in half: train, test
    test_fraction: float = 0.5  # a larger test half than Table 2's, for tighter intervals
    epochs: int = 10  # App. A.1 says 25 (single prompts, lr 1e-3); batches of 8 at 10x lr converge in 10 here
    batch_size: int = 8
    lr_scalar: float = 1e-2  # App. A.1 gives 1e-3 for single-prompt training; batches of 8 move 10x slower
    lr_vector: float = 1e-3
    lambda_m: float = 0.1  # the sparse-alpha row (Fig. 3): interventions.pipeline.SPARSE_LAMBDA_M
    refits: int = 5  # Fig. 4: SteerVec fitted 5 times on one prompt
    refit_epochs: int = 50
    attribution_n: int = 4  # prompts whose scores become scalars (Sec. 6.1; Fig. 9 uses one prompt)
    fv_tasks: tuple[str, ...] | None = None  # None: the FV preset's tasks
    fv_quick: bool = False
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for k in ("ccc_n", "epochs", "batch_size", "refits", "refit_epochs", "attribution_n"):
            positive_int(k, getattr(self, k))
        nonneg_int("seed", self.seed)
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}.")
        if self.ccc_n < 8:
            raise ValueError(f"ccc_n must be >= 8 (train and test splits need prompts), got {self.ccc_n}.")
        if self.refits < 2:
            raise ValueError(f"refits must be >= 2 (pairs of refits are compared), got {self.refits}.")

    @classmethod
    def quick(cls, **overrides) -> "ReplicateConfig":
        """Every row on tiny sizes (the test suite's run on a tiny random model)."""
        base = cls(ccc_n=12, epochs=2, batch_size=4, refits=3, refit_epochs=3, attribution_n=4, fv_quick=True)
        return replace(base, **overrides)
