"""The replication report: its intervals against scipy, its row rules, its per-prompt
E_0/F against ``evaluate``, and ``mechsteer replicate --quick`` end to end on a tiny model."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from mechsteer.cli import main
from mechsteer.interventions.evaluate import evaluate
from mechsteer.replicate import Claim, ReplicateConfig
from mechsteer.replicate import steering
from mechsteer.replicate.stats import bootstrap, paired, wilson


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (10, 10), (27, 50), (1, 1)])
def test_wilson_matches_scipy(k, n):
    p, lo, hi = wilson(k, n)
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert p == k / n and lo == pytest.approx(ref.low, abs=1e-9) and hi == pytest.approx(ref.high, abs=1e-9)


def test_bootstrap_and_paired():
    x = np.arange(20.0)
    m, lo, hi = bootstrap(x)
    assert m == x.mean() and lo < m < hi and bootstrap(x) == (m, lo, hi)  # seeded: the same every time
    assert paired(x + 1, x) == (1.0, 1.0, 1.0)  # a constant difference has no spread
    with pytest.raises(ValueError, match="same length"):
        paired(x, x[:3])
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap([1.0, math.nan])
    with pytest.raises(ValueError, match="k="):
        wilson(3, 2)


def test_claim_refuses_nan_and_unknown_verdict():
    kw = dict(paper="003", where="x", claim="c", paper_value="v", measure="m", n=1, why="w")
    with pytest.raises(ValueError, match="not finite"):
        Claim(value=math.nan, lo=0.0, hi=0.0, verdict="reproduced", **kw)
    with pytest.raises(ValueError, match="verdict"):
        Claim(value=0.0, lo=0.0, hi=0.0, verdict="maybe", **kw)


def test_config_checks():
    with pytest.raises(ValueError, match="refits"):
        ReplicateConfig(refits=1)
    with pytest.raises(ValueError, match="ccc_n"):
        ReplicateConfig(ccc_n=4)


def test_per_prompt_e0_f_means_are_evaluate(tiny_llama):
    from mechsteer.interventions import ActivScalar
    from mechsteer.tasks import ccc

    ds = ccc(tiny_llama, n=6)
    iv = ActivScalar.for_model(tiny_llama, sites=["attn_out", "mlp_out"], n_pos=ds.n_pos)
    for p in iv.params.values():
        p.data.normal_(0, 0.5)
    e, f = steering.per_prompt_e0_f(tiny_llama, iv, ds, batch_size=4)
    r = evaluate(tiny_llama, iv, ds)
    assert e.mean() == pytest.approx(r["effectiveness"], rel=1e-5) and f.mean() == pytest.approx(r["faithfulness"], rel=1e-4, abs=1e-6)
    zero = ActivScalar.for_model(tiny_llama, sites=["attn_out"], n_pos=ds.n_pos)
    e0, f0 = steering.per_prompt_e0_f(tiny_llama, zero, ds)
    assert np.allclose(e0, steering.unsteered_e0(tiny_llama, ds), atol=1e-5) and np.allclose(f0, 0, atol=1e-6)


def test_cli_quick_run_writes_every_row(tmp_path):
    out = tmp_path / "rep"
    assert main(["replicate", "--quick", "--model", "tiny-llama", "--out", str(out)]) == 0
    claims = pd.read_csv(out / "claims.csv")
    assert len(claims) >= 12 and set(claims["paper"].astype(str).str.zfill(3)) == {"000", "003", "004"}
    assert claims[["value", "lo", "hi"]].notna().all().all() and (claims["lo"] <= claims["hi"] + 1e-12).all()
    page = (out / "index.html").read_text()
    assert "Replication: the papers" in page and page.count("<tr>") >= len(claims)
    md = (out / "REPLICATION.md").read_text()
    assert "## Documented differences" in md and "## How the papers' protocols are followed" in md
    from mechsteer.replicate import ReplicationRun

    again = ReplicationRun.read(out)  # what was written renders again without running anything
    assert again.markdown() == md.removeprefix("# Replication report\n\n") and list(again.tables) == ["FV accuracy", "Table 1"]
    assert md.count("\n| ") >= len(claims) and "nan" not in md.lower().split("## how the papers'")[0]
