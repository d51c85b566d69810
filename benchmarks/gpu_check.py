"""Every attribution method on CUDA, in float32 and bfloat16, checked against CPU float32.

On the embedded SmolLM2 (``--model tiny`` for the tiny llama) and an IOI batch
(``--n`` prompts), the script computes per-head (or per-site) scores of each method on
CPU in float32 (the reference), then on ``cuda`` in float32 and in bfloat16, and prints
per method and dtype:

- ``spearman``: rank correlation of the flattened scores with the CPU reference, and
  ``jaccard20``: overlap of the top-20 locations by |score| (where near-zero scores make
  ranks noise);
- ``max_abs_diff`` / ``max_abs_ref``: the largest absolute difference, against the
  reference's largest absolute score; ``finite``: no NaN/inf;
- ``seconds``: the method's wall time after one warm-up (``torch.cuda.synchronize``d), and
  ``forward_eq``: that time over one plain forward of the same batch on the same device
  and dtype (``mechsteer.runs.plain_forward_seconds``); ``peak_mib``: CUDA max allocated.

Methods: activation patching (z heads, all positions pooled), AtP and AtP* (z),
AtP-IG (z), DLA (z), AttnLRP (head readout). Results go to ``--out`` as JSON.
Without a CUDA device the script says so and exits with status 1 (nothing is measured).

    python benchmarks/gpu_check.py [--model smollm2|tiny] [--n 8] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def methods():
    """name -> fn(model, ds) -> scores tensor (one method's per-location scores)."""
    from mechsteer.attribution import (
        activation_patching,
        atp_ig_all,
        atp_star,
        attnlrp,
        attribution_patching,
        direct_logit_attribution,
    )

    return {
        "patching_z": lambda m, ds: activation_patching(m, ds, site="z", per_position=False, progress=False).scores,
        "atp_z": lambda m, ds: attribution_patching(m, ds, site="z").scores,
        "atp_star_z": lambda m, ds: atp_star(m, ds, site="z").scores,
        "atp_ig_z": lambda m, ds: atp_ig_all(m, ds, sites=["z"])["z"].scores,
        "dla_z": lambda m, ds: direct_logit_attribution(m, ds, site="z").scores,
        "attnlrp_heads": lambda m, ds: attnlrp(m, ds, readout="heads", progress=False).scores,
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int) -> tuple[torch.Tensor, float]:
    """(result of one warm-up call, median wall time of ``reps`` more)."""
    out = fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def agreement(a: torch.Tensor, ref: torch.Tensor) -> dict:
    """Spearman, top-20 Jaccard, max |a - ref| and max |ref| of two score tensors."""
    from mechsteer.attribution.compare import spearman

    a, ref = a.detach().float().cpu().flatten(), ref.detach().float().cpu().flatten()
    k = min(20, ref.numel())
    top_a, top_r = set(a.abs().topk(k).indices.tolist()), set(ref.abs().topk(k).indices.tolist())
    return {"spearman": spearman(a, ref), "jaccard20": len(top_a & top_r) / len(top_a | top_r),
            "max_abs_diff": float((a - ref).abs().max()), "max_abs_ref": float(ref.abs().max()),
            "finite": bool(torch.isfinite(a).all())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--n", type=int, default=8, help="IOI prompts")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, torch.cuda.is_available() is False); "
              "nothing was measured. Run it on a machine with an NVIDIA GPU and a CUDA build of torch.",
              file=sys.stderr)
        return 1
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import machine_info, write_result

    import mechsteer
    from mechsteer.runs import plain_forward_seconds
    from mechsteer.tasks import ioi

    name = "tiny-llama" if args.model == "tiny" else None
    fns = methods()
    cpu = mechsteer.load_model(name, device="cpu")
    ds_cpu = ioi(cpu, n=args.n)
    ref = {m: fn(cpu, ds_cpu) for m, fn in fns.items()}
    del cpu
    rows = []
    for dtype_name, dtype in DTYPES.items():
        model = mechsteer.load_model(name, device="cuda", dtype=dtype)
        ds = ioi(model, n=args.n)
        fwd = plain_forward_seconds(model, ds.tokens, repeats=max(3, args.reps))
        print(f"\n{dtype_name}: plain forward {fwd * 1e3:.2f} ms ({ds.tokens.shape[0]} x {ds.tokens.shape[1]} tokens)")
        for m, fn in fns.items():
            torch.cuda.reset_peak_memory_stats()
            scores, seconds = timed(lambda: fn(model, ds), "cuda", args.reps)
            row = {"method": m, "dtype": dtype_name, "seconds": seconds, "forward_eq": seconds / fwd,
                   "peak_mib": torch.cuda.max_memory_allocated() / 2**20, **agreement(scores, ref[m])}
            rows.append(row)
            print(f"  {m:<14} {seconds * 1e3:9.1f} ms  {row['forward_eq']:8.1f} fwd-eq  spearman {row['spearman']:.4f}  "
                  f"jaccard20 {row['jaccard20']:.2f}  max|diff| {row['max_abs_diff']:.2e} (max|ref| "
                  f"{row['max_abs_ref']:.2e})  finite {row['finite']}  peak {row['peak_mib']:.0f} MiB", flush=True)
        del model
        torch.cuda.empty_cache()
    write_result(args.out, {"model": args.model, "n": args.n, "rows": rows,
                            "machine": machine_info(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
