"""Peak memory of each attribution method, against one plain forward's.

Each case runs in a fresh subprocess (``python bench_memory.py --case NAME ...``), so no
allocator state or cached tensor of one case counts against another. The subprocess loads
the model, builds an IOI batch (``mechsteer.tasks.ioi(model, n=--n)``), runs one warm-up
plain forward, then:

- on CPU, resets the process's peak RSS (``echo 5 > /proc/self/clear_refs`` resets
  ``VmHWM``, Linux >= 4.0), runs the case once and reads ``VmHWM``: the case's peak RSS.
  ``extra`` is that peak minus the RSS just before the case (model, data and Python
  already resident; glibc's ``malloc_trim`` first returns the warm-up's freed heap);
- on CUDA (``--device cuda``), resets ``torch.cuda``'s peak statistics and reads
  ``max_memory_allocated`` minus the memory allocated before the case.

``ratio`` divides each case's ``extra`` by the plain forward's. Cases: ``forward`` (one
plain forward, no grad), ``patching`` (``activation_patching``, attn_out at every
position, default chunking from ``runs.batch_rows``'s budget), ``atp``
(``attribution_patching`` attn_out), ``dla`` (``direct_logit_attribution`` z) and
``attnlrp`` (all readouts). ``--max-memory`` is passed to patching's chunking where the
method takes it (see ``mechsteer.runs.batch_rows``).

    python benchmarks/bench_memory.py [--model smollm2|tiny] [--n 8] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CASES = ("forward", "patching", "atp", "dla", "attnlrp")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (peak RSS needs Linux)")


def _trim() -> None:
    """glibc's ``malloc_trim(0)``: return free heap memory to the OS (no-op elsewhere)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_case(case: str, model_choice: str, n: int, device: str) -> dict:
    """Run one case in this process and return its memory figures (bytes) and seconds."""
    import torch

    import mechsteer
    from mechsteer.attribution import activation_patching, attnlrp, attribution_patching, direct_logit_attribution
    from mechsteer.tasks import ioi

    model = mechsteer.load_model("tiny-llama" if model_choice == "tiny" else None, device=device)
    ds = ioi(model, n=n)
    with torch.no_grad():
        model(ds.tokens)  # warm-up: lazy buffers, kernels
    fns = {
        "forward": lambda: torch.no_grad()(model)(ds.tokens),
        "patching": lambda: activation_patching(model, ds, site="attn_out", progress=False),
        "atp": lambda: attribution_patching(model, ds, site="attn_out"),
        "dla": lambda: direct_logit_attribution(model, ds, site="z"),
        "attnlrp": lambda: attnlrp(model, ds, progress=False),
    }
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _trim()  # hand freed heap pages back, so that the case's allocations show in RSS again
        before = _status_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak RSS) to the current RSS
    start = time.perf_counter()
    fns[case]()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    return {"case": case, "before_bytes": before, "peak_bytes": peak, "extra_bytes": peak - before,
            "seconds": time.perf_counter() - start, "n_pos": int(ds.tokens.shape[1]), "n": int(ds.tokens.shape[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--n", type=int, default=8, help="IOI prompts")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # the subprocess's one case
    ap.add_argument("--out", default="benchmarks/results/bench_memory.json")
    args = ap.parse_args()
    if args.case is not None:
        print(json.dumps(run_case(args.case, args.model, args.n, args.device)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import machine_info, write_result

    rows = []
    for case in args.cases.split(","):
        cmd = [sys.executable, __file__, "--case", case, "--model", args.model, "--n", str(args.n),
               "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"case {case} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{case:>9}: extra {rows[-1]['extra_bytes'] / 2**20:8.1f} MiB  peak {rows[-1]['peak_bytes'] / 2**20:8.1f} MiB"
              f"  {rows[-1]['seconds']:.2f} s", flush=True)
    base = next((r["extra_bytes"] for r in rows if r["case"] == "forward"), None)
    for r in rows:
        r["ratio_to_forward"] = None if not base else r["extra_bytes"] / base
    print("\ncase       extra MiB   x forward")
    for r in rows:
        ratio = "" if r["ratio_to_forward"] is None else f"{r['ratio_to_forward']:8.1f}"
        print(f"{r['case']:<9} {r['extra_bytes'] / 2**20:10.1f} {ratio}")
    write_result(args.out, {"model": args.model, "n": args.n, "device": args.device, "cases": rows,
                            "machine": machine_info(method="peak RSS (VmHWM reset) per subprocess"
                                                    if args.device == "cpu" else "torch.cuda.max_memory_allocated")})


if __name__ == "__main__":
    main()
