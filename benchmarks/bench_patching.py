"""Activation patching of every attention head: mechsteer vs transformer_lens.patching.

On IOI prompts (``mechsteer.tasks.ioi(model, n)``), denoising, default metric (mean logit
difference), under ``torch.no_grad``, one run each (wall clock, ``time.perf_counter``):

- heads, all positions (site ``z``, ``per_position=False``, grid layer x head):
  ``activation_patching`` vs TL's ``get_act_patch_attn_head_out_all_pos`` (plus the
  ``run_with_cache`` of the clean ``hook_z`` it needs), full grid for both;
- heads by position (``per_position=True``, grid layer x head x pos): mechsteer on the
  full grid; TL (``generic_activation_patch`` with an ``index_df``) on ``--tl-layers``
  evenly spaced layers only, its full-grid time extrapolated linearly (TL runs one full
  forward per cell, so its time is cells x one forward; pass ``--tl-layers 0`` for all).

Numbers are checked on the shared cells (max abs diff of the raw patched metric).
Forward equivalents = time / one plain forward of the same batch (``plain_forward_seconds``).
``--threads`` defaults to 1: on a shared, oversubscribed CPU, multi-threaded BLAS spins
and timings swing by orders of magnitude.

    python benchmarks/bench_patching.py [--model tiny|smollm2] [--n 8] [--tl-layers 2]
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch
import transformer_lens.patching as tlp

from _common import machine_info, write_result

import mechsteer
from mechsteer.attribution import activation_patching
from mechsteer.metrics import default_metric
from mechsteer.runs import plain_forward_seconds
from mechsteer.tasks import ioi


def raw(result) -> torch.Tensor:
    """Patched metric values (denoising): m_corr + score * (m_clean - m_corr)."""
    clean, corr = result.meta["clean_metric"], result.meta["corrupted_metric"]
    return corr + result.scores * (clean - corr)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--n", type=int, default=8, help="IOI prompts")
    ap.add_argument("--tl-layers", type=int, default=2, help="layers TL patches by position (0 = all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", default="benchmarks/results/patching.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.model == "tiny":
        from mechsteer.tiny import tiny_model

        model = tiny_model("llama")
    else:
        model = mechsteer.load_model()
    ds = ioi(model, n=args.n)
    cfg = model.cfg
    metric = lambda logits: default_metric(logits, ds)  # noqa: E731
    z_names = lambda name: name.endswith("attn.hook_z")  # noqa: E731
    plain = plain_forward_seconds(model, ds.tokens)
    rows = {}

    with torch.no_grad():
        # heads, all positions: full grid on both sides
        ours, t_ours = timed(lambda: activation_patching(model, ds, site="z", per_position=False, direction="denoising",
                                                     progress=False))

        def tl_all():
            _, cache = model.run_with_cache(ds.tokens, names_filter=z_names)
            return tlp.get_act_patch_attn_head_out_all_pos(model, ds.corrupted_tokens, cache, metric)

        ref, t_tl = timed(tl_all)
        rows["z_all_pos"] = {
            "grid": [cfg.n_layers, cfg.n_heads], "cells": cfg.n_layers * cfg.n_heads,
            "mechsteer_s": t_ours, "tl_s": t_tl, "tl_extrapolated": False,
            "max_abs_diff": (raw(ours) - ref.cpu()).abs().max().item(), "meta": ours.meta,
        }

        # heads by position: TL on a subset of layers, extrapolated
        ours, t_ours = timed(lambda: activation_patching(model, ds, site="z", per_position=True, direction="denoising",
                                                     progress=False))
        k = cfg.n_layers if args.tl_layers <= 0 else min(args.tl_layers, cfg.n_layers)
        layers = torch.linspace(0, cfg.n_layers - 1, k).round().long().unique().tolist()
        cells = [(l, p, h) for l in layers for p in range(ds.n_pos) for h in range(cfg.n_heads)]

        def tl_by_pos():
            _, cache = model.run_with_cache(ds.tokens, names_filter=z_names)
            return tlp.generic_activation_patch(
                model, ds.corrupted_tokens, cache, metric, tlp.layer_pos_head_vector_patch_setter, "z",
                index_df=pd.DataFrame(cells, columns=["layer", "pos", "head"]),
            )

        ref, t_tl = timed(tl_by_pos)
        mine = torch.stack([raw(ours)[l, h, p] for l, p, h in cells])
        rows["z_by_pos"] = {
            "grid": [cfg.n_layers, cfg.n_heads, ds.n_pos], "cells": cfg.n_layers * cfg.n_heads * ds.n_pos,
            "mechsteer_s": t_ours, "tl_s": t_tl * cfg.n_layers / len(layers), "tl_extrapolated": len(layers) < cfg.n_layers,
            "tl_measured_s": t_tl, "tl_layers": layers,
            "max_abs_diff": (mine - ref.cpu()).abs().max().item(), "meta": ours.meta,
        }

    for r in rows.values():
        r["speedup"] = r["tl_s"] / r["mechsteer_s"]
        r["mechsteer_forward_equivalents"] = r["mechsteer_s"] / plain
        r["tl_forward_equivalents"] = r["tl_s"] / plain

    print(f"model={cfg.model_name} prompts={len(ds)} pos={ds.n_pos} plain forward={plain * 1e3:.1f} ms threads={args.threads}")
    print(f"{'case':<11}{'cells':>7}{'mechsteer s':>13}{'TL s':>10}{'speedup':>9}{'fwd-eq ours':>13}{'fwd-eq TL':>11}{'max|diff|':>11}")
    for name, r in rows.items():
        tl = f"{r['tl_s']:.1f}" + ("*" if r["tl_extrapolated"] else "")
        print(f"{name:<11}{r['cells']:>7}{r['mechsteer_s']:>13.1f}{tl:>10}{r['speedup']:>9.1f}"
              f"{r['mechsteer_forward_equivalents']:>13.1f}{r['tl_forward_equivalents']:>11.1f}{r['max_abs_diff']:>11.2e}")
    if rows["z_by_pos"]["tl_extrapolated"]:
        r = rows["z_by_pos"]
        print(f"* TL measured {r['tl_measured_s']:.1f} s on layers {r['tl_layers']}, scaled to {cfg.n_layers} layers")

    result = {
        "benchmark": "patching",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": cfg.model_name,
        "n_prompts": len(ds),
        "n_pos": ds.n_pos,
        "plain_forward_s": plain,
        "machine": machine_info(),
        "results": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
