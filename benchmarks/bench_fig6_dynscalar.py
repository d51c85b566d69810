"""Seed paper 003 Fig. 6 on CCC: DynScalar trained on each template vs on all templates together.

One call, ``transfer_matrix(..., include_all=True)``: one DynScalar (attn_out + mlp_out,
every layer) per CCC template, trained on that template's train split, plus the "(all)"
row trained on every template's train split together (prompts of different lengths,
right-padded); each row's test E_0 (Eq. 6, m = 0) and F (Eq. 7) on every template's test
split. ``ccc(..., same_length=False)`` keeps every fact, so each template's own prompts
already differ in length (country names tokenise differently). The "(none)" row is the
unsteered model. The (all) row trains on ``len(templates)`` times the prompts of a
single-template row, as in the paper.

    python benchmarks/bench_fig6_dynscalar.py [--model smollm2|tiny] [--n 64] [--epochs 10] [--lr 1e-2]

SmolLM2-135M, ``--n 64 --epochs 10 --lr 1e-2`` (batch 16, m = 1, lambda_F = 1, one seed;
48 train / 16 test prompts per template, lengths 15-27; 42 min on one shared CPU thread),
test E_0 (closer to 0 is better):

| train \\ test | t0 | t1 | t2 | t3 |
| --- | --- | --- | --- | --- |
| (none) | -3.329 | -2.844 | -3.204 | -3.725 |
| t0 | -0.199 | -0.478 | -0.100 | -0.493 |
| t1 | -0.108 | -0.114 | -0.291 | -0.321 |
| t2 | -0.246 | -0.269 | -0.011 | -0.307 |
| t3 | -0.410 | -0.814 | -0.121 | -0.062 |
| (all) | -0.337 | -0.176 | -0.375 | -0.319 |

The (all) row is about as effective as transfer from another template (worse than a
template's own row) and the most faithful on every test set (F -0.25 to -0.41, single
templates -0.48 to -1.75).
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import load, machine_info, write_result

from mechsteer.interventions import DynScalar, TrainConfig
from mechsteer.interventions.transfer import transfer_matrix
from mechsteer.tasks import ccc


def markdown(df) -> str:
    """A pandas frame as a markdown table (no tabulate dependency)."""
    rows = [["train \\ test", *map(str, df.columns)], ["---"] * (len(df.columns) + 1)]
    rows += [[str(i), *(f"{v:.3f}" for v in r)] for i, r in zip(df.index, df.to_numpy())]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--n", type=int, default=64, help="CCC prompts per template (3/4 train, 1/4 test)")
    ap.add_argument("--templates", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=None, help="Adam step (default: App. A.1's 1e-3 for DynScalar)")
    ap.add_argument("--out", default="benchmarks/results/fig6_dynscalar.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load(args.model)
    sets = {f"t{t}": ccc(model, n=args.n, template=t, same_length=False) for t in args.templates}
    make = lambda m, ds: DynScalar.for_model(m, sites=["attn_out", "mlp_out"])  # noqa: E731
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, progress=False)
    t0 = time.perf_counter()
    df = transfer_matrix(model, make, sets, config, include_all=True, batch_size=args.batch_size, progress=True)
    seconds = time.perf_counter() - t0
    lengths = {k: sorted(set(v.lengths.tolist())) for k, v in sets.items()}
    print(f"prompt lengths per template: {lengths}")
    for metric in ("effectiveness", "faithfulness"):
        print(f"\n{metric} (test split; rows = train set)\n")
        print(markdown(df[metric]))
    write_result(args.out, {
        "model": args.model, "n_per_template": args.n, "templates": args.templates, "epochs": args.epochs, "lr": args.lr,
        "batch_size": args.batch_size, "lengths": lengths, "seconds": seconds,
        "effectiveness": df["effectiveness"].to_dict(orient="index"),
        "faithfulness": df["faithfulness"].to_dict(orient="index"),
        "machine": machine_info(),
    })


if __name__ == "__main__":
    main()
