"""The replication report: each claim of papers 000, 003 and 004 that a small model can
test, beside what mechsteer measures, with a 95% interval and a verdict.

``replicate(model, ReplicateConfig())`` runs every row (``mechsteer replicate --out DIR``
on the command line; ``ReplicateConfig.quick()`` on a tiny model in the test suite) and
returns a ``ReplicationRun``: ``.table()`` (one row per ``Claim``), ``.markdown()`` and
``.write(out)``. REPLICATION.md at the repository root is one such run on the embedded
SmolLM2-135M-Instruct.

Modules: ``claims`` (the row type, the run's sizes), ``stats`` (Wilson and bootstrap
intervals), ``steering`` (paper 003 rows), ``fv_claims`` (papers 000 and 004 rows),
``run`` (``replicate``, ``ReplicationRun``).
"""

from mechsteer.replicate.claims import VERDICTS, Claim, ReplicateConfig
from mechsteer.replicate.run import ReplicationRun, replicate

__all__ = ["VERDICTS", "Claim", "ReplicateConfig", "ReplicationRun", "replicate"]
