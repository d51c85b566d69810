"""Cold and warm load time of the embedded model (SmolLM2-135M from its GGUF).

Each load runs in a fresh subprocess (``import mechsteer`` + ``mechsteer.load_model()``):

- cold: ``MECHSTEER_CACHE`` points at a new empty temporary directory, so the GGUF is
  dequantised and the cache entry written;
- warm: the same directory again, now filled;
- default: the user's default cache (``~/.cache/mechsteer``), for reference.

Each row reports the load time (inside the subprocess), the whole subprocess wall time
(interpreter start and imports included) and its CPU time (user + system, all threads;
about equal to the wall time when the cores are free); ratios are to the warm load of
the same run.

    python benchmarks/bench_load.py [--out benchmarks/results/load.json]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from _common import machine_info, write_result

SNIPPET = (
    "import time; t0 = time.perf_counter(); import mechsteer; t1 = time.perf_counter(); "
    "mechsteer.load_model(); t2 = time.perf_counter(); print(t1 - t0, t2 - t1)"
)


def run_load(cache: str | None) -> dict[str, float]:
    """Import + load in a fresh interpreter; ``cache=None`` uses the default cache."""
    env = dict(os.environ)
    env.pop("MECHSTEER_CACHE", None)
    if cache is not None:
        env["MECHSTEER_CACHE"] = cache
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, check=True, capture_output=True, text=True)
    total = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    imp, load = map(float, out.stdout.strip().splitlines()[-1].split())
    return {"import_s": imp, "load_s": load, "subprocess_s": total, "subprocess_cpu_s": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/load.json", help="JSON results path")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="mechsteer-bench-")
    try:
        rows = {"cold": run_load(tmp), "warm": run_load(tmp)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows["default_cache"] = run_load(None)

    warm = rows["warm"]["load_s"]
    for r in rows.values():
        r["load_ratio_to_warm"] = r["load_s"] / warm
        r["cpu_ratio_to_warm"] = r["subprocess_cpu_s"] / rows["warm"]["subprocess_cpu_s"]
    print(f"{'case':<14}{'import s':>10}{'load s':>10}{'process s':>11}{'load/warm':>11}{'cpu s':>8}{'cpu/warm':>10}")
    for name, r in rows.items():
        print(f"{name:<14}{r['import_s']:>10.2f}{r['load_s']:>10.2f}{r['subprocess_s']:>11.2f}"
              f"{r['load_ratio_to_warm']:>11.2f}{r['subprocess_cpu_s']:>8.2f}{r['cpu_ratio_to_warm']:>10.2f}")


    result = {
        "benchmark": "load",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "results": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
