"""The ``mechsteer`` command line: ``info``, ``tasks``, ``attribute`` and ``demo``.

    mechsteer info                       # model, sizes, sites
    mechsteer tasks --task ccc --n 8     # generated prompts and drop counts
    mechsteer attribute --task ioi --methods patching,atp,atp*,atp-ig,dla,attnlrp --n 16 --out DIR
    mechsteer steer --task ccc --method activ_scalar --sites attn_out,mlp_out --out DIR
    mechsteer pareto --task ccc --out DIR --workers 2  # lambda_F x lambda_M x m grid on an Optuna study, resumable
    mechsteer fv --tasks antonym,capitalize --select aie,lrp,atp --inject fv,dfv --out DIR
    mechsteer demo --out out/demo        # the HTML report on the embedded model

Bad input stops a command before any model is loaded, with one line and exit status 2
(argparse's convention): option values are checked as they are parsed (``_cli_args``),
then ``--out``, then the model name. Errors that the library raises for bad arguments
(ValueError, FileNotFoundError, ImportError for a missing model wheel) become one line
too; anything else is a bug and keeps its traceback. ``MECHSTEER_DEBUG=1`` shows the
traceback of every error. Ctrl-C stops with one line and exit status 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from mechsteer import _cli_args as A
from mechsteer import _io
from mechsteer.demo import DEMO_FV_TASKS

_MODEL_HELP = "model name: an embedded model (default SmolLM2-135M-Instruct, or gemma-3-270m), 'tiny-llama'/'tiny-gpt2' (random weights, for smoke tests), or a Hugging Face name"




def _load(name: str | None):
    """``load_model(name)``; a name that cannot be loaded here is an error of ``--model``."""
    from mechsteer.models import load_model

    try:
        return load_model(name)
    except BAD_INPUT as e:
        raise A.OptionError("--model", A.one_line(e)) from e


def _log(msg: str) -> None:
    print(f"[mechsteer] {msg}", file=sys.stderr, flush=True)


def cmd_info(args: argparse.Namespace) -> int:
    from mechsteer.models import describe
    from mechsteer.sites import site_table

    model = _load(args.model)
    info = describe(model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    print("\nsites (shape per layer for a prompt of 8 tokens):")
    for row in site_table(model, 8):
        print(f"  {row['site']:<15} {row['hook']:<37} {row['shape (pos=8)']:<14} {row['used by']:<33} {row['meaning']}")
    return 0


def _task(args: argparse.Namespace) -> str:
    """``--data FILE`` when given (a user's records), else ``--task``'s name."""
    return args.data if getattr(args, "data", None) else args.task


def cmd_tasks(args: argparse.Namespace) -> int:
    import pandas as pd

    from mechsteer.tasks import make_task

    model = _load(args.model)
    ds = make_task(_task(args), model, n=args.n, seed=args.seed)
    stats = ds.evaluate(model)
    lengths = sorted(set(ds.lengths.tolist()))
    span = f"{lengths[0]}" if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}"
    print(f"{ds.name}: {len(ds)} prompts of {span} tokens; dropped {ds.dropped or 'none'}")
    print(f"model prefers the correct answer on {stats['accuracy']:.0%} of clean prompts "
          f"(mean logit diff {stats['logit_diff']:.3f}), {stats['corrupted_accuracy']:.0%} of corrupted")
    with pd.option_context("display.max_colwidth", 100, "display.width", 200):
        print(ds.to_frame().drop(columns=["correct_id", "wrong_id"]).head(args.show).to_string())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mechsteer.demo import DemoConfig, run_demo

    t0 = time.perf_counter()
    given = {k: getattr(args, k) for k in ("n", "attribution_n", "steer_n", "steer_epochs", "fv_tasks", "seed")
             if getattr(args, k) is not None}
    cfg = DemoConfig.full(**given) if args.full else DemoConfig(**given)
    _log(f"loading model ({cfg.size} demo)")
    model = _load(args.model)
    report = run_demo(model, cfg, log=_log)
    path = report.write(args.out)
    _log(f"wrote {path} and {Path(args.out) / 'summary.json'} in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_attribute(args: argparse.Namespace) -> int:
    from mechsteer import _io
    from mechsteer.attribution.suite import run_suite
    from mechsteer.report import Report, attribution_section
    from mechsteer.tasks import make_task

    methods = list(args.methods)  # names checked by argparse (_cli_args.attribution_methods)
    model = _load(args.model)
    ds = make_task(_task(args), model, n=args.n, seed=args.seed)
    _log(f"{ds.name}: {len(ds)} prompts of up to {ds.n_pos} tokens; methods {methods}")
    suite = run_suite(model, ds, methods, direction=args.direction)
    out = suite.write(args.out)  # data: scores.csv, costs.csv, agreement.csv, figures.html, summary.json
    report = Report(f"mechsteer attribution: {ds.name} on {model.cfg.model_name}")
    report.add(attribution_section([suite]))
    _io.write_text(out / "index.html", report.to_html())  # the report: all figures, plotly.js inlined
    for m, fe in suite.forward_equivalents.items():
        _log(f"{m:<9} {suite.seconds[m]:8.2f} s  {fe:7.2f} forward-equivalents")
    _log(f"wrote {out / 'index.html'}, figures.html, scores.csv, costs.csv, agreement.csv, summary.json")
    return 0


def _train_config(args: argparse.Namespace, **overrides):
    from mechsteer.interventions.train import TrainConfig

    return TrainConfig(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, margin=args.margin,
        lambda_f=args.lambda_f, lambda_m=args.lambda_m, seed=args.seed, **overrides,
    )


def cmd_steer(args: argparse.Namespace) -> int:
    from mechsteer.interventions.pipeline import steer_task

    config = _train_config(args)  # fail before loading the model
    model = _load(args.model)
    _log(f"training {args.method} on {_task(args)} at {','.join(args.sites)}")
    run = steer_task(model, _task(args), args.method, args.sites, n=args.n, positions=args.positions,
                     config=config, seed=args.seed)
    path = run.write(args.out)
    s = run.summary()
    for split in ("train", "test"):
        m = s[split]
        _log(f"{split:<5} E_0={m['effectiveness']:.3f}  F={m['faithfulness']:.3f}  "
             f"minimality={m['minimality']}/{s['n_params']}")
    _log(f"wrote {path.parent}/ (intervention/, history.csv, figures.html, summary.json) in {s['seconds']:.0f}s")
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    from mechsteer.embedded import resolve_embedded
    from mechsteer.interventions.pareto_run import pareto_search

    model = _load(args.model)
    grid = {"storage": args.storage, "study": args.study, "sampler": args.sampler}
    run = pareto_search(model, _task(args), args.out, n=args.n, seed=args.seed, methods=args.methods, sites=args.sites,
                        lambda_f=args.lambda_f, lambda_m=args.lambda_m, margins=args.margins,
                        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, workers=args.workers,
                        model_name=args.model or resolve_embedded(None).name, n_trials=args.n_trials, **grid)
    run.write(args.out)
    _log(f"{len(run.grid)} configurations (study {run.study!r} in {run.storage}); "
         f"wrote {args.out}/ (trials.csv, grid.jsonl, pareto.html, summary.json)")
    return 0


def cmd_fv(args: argparse.Namespace) -> int:
    from mechsteer.fv.pipeline import FVConfig, run_fv

    cfg = FVConfig(
        tasks=args.tasks or None, protocol=args.protocol, n_shots=args.n_shots, n_train=args.n_train, n_val=args.n_val,
        style=args.style, select=args.select, inject=args.inject, k=args.k,
        n_instructions=args.n_instructions, n_queries=args.n_queries, n_cie=args.n_cie, n_test=args.n_test,
        min_correct=args.min_correct, pool=args.pool, sweep_layers=args.sweep_layers,
        scale=args.scale, naive_samples=args.naive_samples, seed=args.seed, filter=not args.no_filter,
        lrp_max_rank=args.lrp_max_rank,
    )
    model = _load(args.model)
    run = run_fv(model, cfg)
    path = run.write(args.out)
    s = run.summary()
    _log(f"tasks: {', '.join(s['tasks'])}")
    for name, row in run.accuracy_table("global").iterrows():
        _log(f"{row['name']:<10} top-1 {row['top1']:.3f}  top-3 {row['top3']:.3f}")
    _log("samples/minute: " + ", ".join(f"{k} {v:.1f}" for k, v in s["samples_per_minute"].items()))
    _log(f"wrote {path.parent}/ (figures.html, accuracy.csv, head_scores.csv, layer_sweep.csv, summary.json) "
         f"in {s['seconds']:.0f}s")
    return 0


def cmd_replicate(args: argparse.Namespace) -> int:
    from mechsteer.replicate import ReplicateConfig, replicate

    cfg = ReplicateConfig.quick(seed=args.seed) if args.quick else ReplicateConfig(seed=args.seed)
    model = _load(args.model)
    command = "mechsteer replicate " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["replicate"] else [])
    from mechsteer.report import Report, model_section, replication_section

    run = replicate(model, cfg, command=command.strip(), log=_log)
    path = run.write(args.out)
    report = Report(f"mechsteer replication: {model.cfg.model_name}", meta=run.meta)
    report.add(model_section(model))
    report.add(replication_section(run))
    _io.write_text(Path(args.out) / "index.html", report.to_html())
    _log("verdicts: " + ", ".join(f"{v} {k}" for k, v in run.counts().items()))
    _log(f"wrote {path.parent}/ (REPLICATION.md, index.html, claims.csv, summary.json) in {run.meta['seconds']:.0f}s")
    return 0


def _add_task_args(p: argparse.ArgumentParser, *, default: str | None = None) -> None:
    """``--task NAME`` or ``--data FILE`` (one of them; a default task makes both optional)."""
    g = p.add_mutually_exclusive_group(required=default is None)
    g.add_argument("--task", choices=["ccc", "ioi"], default=default, help="a built-in task")
    g.add_argument("--data", type=A.data_file, default=None, metavar="FILE",
                   help="your own records: .jsonl/.json/.csv with prompt, corrupted, correct, wrong[, positions]")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    _add_task_args(p, default="ccc")
    p.add_argument("--n", type=A.positive_int, default=64, help="prompts (split 3:1 into train and test)")
    p.add_argument("--epochs", type=A.positive_int, default=25, help="Adam epochs (App. A.1: 25)")
    p.add_argument("--lr", type=A.positive_float, default=None, help="learning rate (default 1e-3 scalars, 1e-4 vectors)")
    p.add_argument("--batch-size", type=A.positive_int, default=32)
    p.add_argument("--seed", type=A.nonneg_int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--model", default=None, help=_MODEL_HELP)


def build_parser() -> argparse.ArgumentParser:
    p = A.ArgumentParser(prog="mechsteer", description="Attribution and learned steering on TransformerLens hook points.")
    sub = p.add_subparsers(dest="command", required=True)
    count, seed = A.positive_int, A.nonneg_int

    info = sub.add_parser("info", help="model, sizes and sites")
    info.add_argument("--model", default=None, help=_MODEL_HELP)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    tasks = sub.add_parser("tasks", help="show a generated contrastive dataset")
    _add_task_args(tasks)
    tasks.add_argument("--n", type=count, default=16, help="number of items")
    tasks.add_argument("--seed", type=seed, default=0)
    tasks.add_argument("--show", type=A.nonneg_int, default=10, help="rows to print")
    tasks.add_argument("--model", default=None, help=_MODEL_HELP)
    tasks.set_defaults(func=cmd_tasks)

    att = sub.add_parser("attribute", help="run attribution methods side by side")
    _add_task_args(att)
    att.add_argument("--methods", type=A.names(A.attribution_methods), default="patching,atp,dla,attnlrp",
                     help="comma-separated, of: " + ",".join(A.attribution_methods()))
    att.add_argument("--n", type=count, default=16, help="prompts")
    att.add_argument("--seed", type=seed, default=0)
    att.add_argument("--direction", choices=["noising", "denoising"], default="noising", help="for patching and AtP")
    att.add_argument("--out", default="out/attribute", help="output directory")
    att.add_argument("--model", default=None, help=_MODEL_HELP)
    att.set_defaults(func=cmd_attribute)

    steer = sub.add_parser("steer", help="train and evaluate one learnable intervention")
    steer.add_argument("--method", type=A.one_name(A.steer_methods), default="activ_scalar",
                       help="activ_scalar, steer_vec or dyn_scalar")
    steer.add_argument("--sites", type=A.names(A.steer_sites), default="attn_out,mlp_out",
                       help="comma-separated: attn_out,mlp_out,resid_post,z")
    steer.add_argument("--positions", type=A.positions, default="all",
                       help="all, last, or comma-separated token positions (negative count from the end: --positions=-1)")
    steer.add_argument("--margin", type=A.nonneg_float, default=1.0, help="m in E_m (Eq. 6)")
    steer.add_argument("--lambda-f", type=A.nonneg_float, default=1.0, help="weight of faithfulness F (Eq. 9)")
    steer.add_argument("--lambda-m", type=A.nonneg_float, default=0.0, help="weight of minimality M_1 (Eq. 9)")
    _add_train_args(steer)
    steer.set_defaults(func=cmd_steer)

    par = sub.add_parser("pareto", help="grid over lambda_F, lambda_M and m on an Optuna study (resumable: rerun to continue)")
    par.add_argument("--methods", type=A.names(A.steer_methods), default="activ_scalar,steer_vec", help="comma-separated methods")
    par.add_argument("--sites", type=A.names(A.steer_sites), default="attn_out,mlp_out", help="comma-separated sites")
    par.add_argument("--lambda-f", type=A.nonneg_floats, default="0,1,10,100", help="values of lambda_F")
    par.add_argument("--lambda-m", type=A.nonneg_floats, default="0,1,10,100", help="values of lambda_M")
    par.add_argument("--margins", type=A.nonneg_floats, default="0,1,10,100", help="values of the margin m")
    par.add_argument("--workers", type=A.positive_int, default=1, help="processes on this machine (each loads the model)")
    par.add_argument("--storage", default=None,
                     help="Optuna storage URL shared by machines, e.g. postgresql://user:pw@host/db (default sqlite:///OUT/study.db)")
    par.add_argument("--study", default=None, help="study name to join (default: derived from the settings)")
    par.add_argument("--sampler", choices=["grid", "nsga2"], default="grid",
                     help="grid: every configuration; nsga2: NSGA-II over the same values for --n-trials trials")
    par.add_argument("--n-trials", type=A.positive_int, default=None,
                     help="stop once the study has this many configurations (needed by nsga2)")
    _add_train_args(par)
    par.set_defaults(func=cmd_pareto)

    fv = sub.add_parser("fv", help="function vectors: head selection, FV vs DFV, zero-shot accuracy")
    fv.add_argument("--tasks", type=A.names(A.fv_tasks, allow_empty=True), default="",
                    help="comma-separated task names (default: all; see mechsteer.tasks.fv.FV_TASKS)")
    fv.add_argument("--protocol", default="icl", choices=["icl", "instruction"],
                    help="icl: Todd et al.'s 10-shot extraction (default); instruction: paper 000's instructions")
    fv.add_argument("--n-shots", type=A.nonneg_int, default=10, help="demonstrations per ICL extraction prompt")
    fv.add_argument("--n-train", type=count, default=30, help="inputs used for extraction (the rest are held out)")
    fv.add_argument("--n-val", type=count, default=10, help="held-out items that pick the FV layer")
    fv.add_argument("--style", default="auto", choices=["auto", "instruction", "chat"],
                    help="instruction protocol's prompt style; auto = the chat template when the model has one")
    fv.add_argument("--select", type=A.names(A.fv_selections), default="aie,lrp,atp", help="head selection: aie,lrp,atp")
    fv.add_argument("--inject", type=A.names(A.fv_injections), default="fv,dfv",
                    help="injection: fv (one layer), dfv (each head at its own place)")
    fv.add_argument("--k", type=count, default=10, help="top-k heads")
    fv.add_argument("--n-instructions", type=count, default=5, help="instructions kept per task")
    fv.add_argument("--n-queries", type=count, default=20, help="filtered prompts per instruction for mean activations")
    fv.add_argument("--n-cie", type=count, default=10, help="prompts (per instruction) scored by AIE / LRP / AtP")
    fv.add_argument("--n-test", type=count, default=50, help="held-out test items per task (answered correctly in context)")
    fv.add_argument("--min-correct", type=A.nonneg_int, default=20, help="correct items an instruction needs (of --pool)")
    fv.add_argument("--pool", type=count, default=60, help="items per instruction tried when ranking instructions")
    fv.add_argument("--sweep-layers", type=A.layers, default="all", help="FV layers to try: all, or comma-separated")
    fv.add_argument("--scale", type=A.finite_float, default=1.0, help="injection scale")
    fv.add_argument("--naive-samples", type=count, default=1,
                    help="prompts every head-scoring method is timed on, at batch 1 and in one batch (Table 1)")
    fv.add_argument("--lrp-max-rank", type=count, default=5, help="LRP skips prompts whose answer ranks below this")
    fv.add_argument("--no-filter", action="store_true", help="keep every task and item (for random-weight test models)")
    fv.add_argument("--seed", type=seed, default=0)
    fv.add_argument("--out", required=True, help="output directory")
    fv.add_argument("--model", default=None, help=_MODEL_HELP)
    fv.set_defaults(func=cmd_fv)

    rep = sub.add_parser("replicate", help="each claim of papers 000, 003, 004 beside mechsteer's measurement (REPLICATION.md)")
    rep.add_argument("--out", required=True, help="output directory (REPLICATION.md, claims.csv, summary.json)")
    rep.add_argument("--quick", action="store_true", help="tiny sizes: every row in seconds (numbers meaningless on tiny models)")
    rep.add_argument("--seed", type=seed, default=0)
    rep.add_argument("--model", default=None, help=_MODEL_HELP)
    rep.set_defaults(func=cmd_replicate)

    demo = sub.add_parser("demo", help="write the HTML report on the embedded model")
    demo.add_argument("--out", default="out/demo", help="output directory (index.html, summary.json)")
    demo.add_argument("--full", action="store_true",
                      help="the paper-sized run (about an hour on 2 CPU cores) instead of the quick one (under 10 minutes)")
    demo.add_argument("--n", type=count, default=None, help="prompts per task (default 32)")
    demo.add_argument("--seed", type=seed, default=None, help="default 0")
    demo.add_argument("--attribution-n", type=A.nonneg_int, default=None,
                      help="prompts per task for the attribution section (default 4, --full 16; 0 skips it)")
    demo.add_argument("--steer-n", type=A.nonneg_int, default=None,
                      help="CCC prompts for the activation-scaling section (default 32, --full 48; 0 skips it)")
    demo.add_argument("--steer-epochs", type=count, default=None, help="training epochs (default 10, --full 25)")
    demo.add_argument("--fv-tasks", type=A.names(A.fv_tasks, allow_empty=True), default=None,
                      help=f"function-vector tasks (default {','.join(DEMO_FV_TASKS)}; '' skips the section)")
    demo.add_argument("--model", default=None, help=_MODEL_HELP)
    demo.set_defaults(func=cmd_demo)
    return p


# Errors that mean bad input (a bad option value, a model that is not there, a missing
# model wheel): one line and exit status 2. TypeError is not among them: argparse has
# typed every value, so a TypeError from the library is a bug, shown with its traceback.
BAD_INPUT = (ValueError, FileNotFoundError, ImportError)


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv``; return the exit status (0 ok, 2 bad input, 130 Ctrl-C)."""
    try:
        try:
            args = build_parser().parse_args(argv)  # one line on a bad option value
        except SystemExit as e:  # --help, or argparse's error: return its status, as for every error
            return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
        if getattr(args, "out", None) is not None:
            A.check_out_dir(args.out)  # before any model is loaded or any work is done
        return args.func(args)
    except KeyboardInterrupt:
        print("mechsteer: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, the shell's convention
    except BrokenPipeError:  # `mechsteer tasks ... | head`: the reader left; stop quietly, as Unix tools do
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        except (OSError, ValueError):
            pass
        return 141  # 128 + SIGPIPE
    except BAD_INPUT as e:
        if os.environ.get("MECHSTEER_DEBUG"):
            raise
        print(f"mechsteer: error: {A.one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
