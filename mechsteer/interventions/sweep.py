"""Sweeps on an Optuna study: one study per sweep, any number of workers, resumable for free.

A sweep is a study in an Optuna storage: SQLite by default (a file ``study.db`` in the
output folder: embedded, nothing to install), or any database URL that SQLAlchemy knows
(``postgresql://user:pw@host/db``) so that processes on several machines join one study.
Every trial is one configuration; its full result row is the trial's user attribute
``row``, and its values are the train split's (E_0, F, minimality) that multi-objective
samplers (NSGA-II) optimise. The study remembers what it is a sweep of: its user
attributes ``fingerprint`` (a SHA-256 of the model's weights and of both splits' tokens
and answers) and ``settings`` (every setting that shapes a result). A worker whose model,
data or settings differ is refused with a ValueError that names what differs, so no
worker can mix rows of another model into a study, tiny random models included.

Resuming needs nothing: a configuration is done once its trial is COMPLETE (or FAIL with a
``row``: a run that diverged, kept with empty measures). Workers send a heartbeat every
``HEARTBEAT_S`` seconds; a trial left RUNNING by a killed worker is failed once its
heartbeat is ``GRACE_S`` seconds old, and a trial that failed without a row (killed,
interrupted) is queued again with the same grid point. ``work(wait=True)`` returns when
every grid point is done, so its caller can export the whole table.

>>> import tempfile
>>> storage = storage_url(tempfile.mkdtemp())
>>> storage.startswith("sqlite:///") and storage.endswith("study.db")
True
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

STUDY_FILE = "study.db"
HEARTBEAT_S = 5.0  # seconds between a running trial's heartbeats
GRACE_S = 20.0  # a RUNNING trial whose heartbeat is older than this was left by a killed worker
DIRECTIONS = ("maximize", "maximize", "minimize")  # train E_0, F, minimality count
SAMPLERS = ("grid", "nsga2")


def storage_url(out: str | os.PathLike) -> str:
    """The default storage of a sweep written to folder ``out``: ``sqlite:///out/study.db``."""
    return f"sqlite:///{Path(out).resolve() / STUDY_FILE}"


def open_storage(url: str):
    """An Optuna ``RDBStorage`` at ``url`` with heartbeats (SQLite waits for locks 60 s)."""
    import optuna

    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"storage must be a database URL such as 'sqlite:///DIR/study.db' or "
                         f"'postgresql://user:pw@host/db', got {url!r}.")
    kw = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with quiet_optuna():  # (heartbeats are "experimental" in Optuna 5, stable since 2.9)
        return optuna.storages.RDBStorage(url, engine_kwargs=kw, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)


def worker_name() -> str:
    """``host:pid`` of this process (the ``worker`` column)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def quiet_optuna():
    """Optuna's logger at WARNING and its ExperimentalWarning off inside the block."""
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(before)


class Sweep:
    """One study of configurations; ``work`` runs them, ``rows`` reads the finished ones.

    ``space`` maps each parameter to its values (the grid); ``objective(params, trial)``
    returns the row of one configuration (a JSON-ready dict with ``key``, ``error`` and
    the measures). ``sampler`` is ``"grid"`` (every point of ``space`` once: Optuna's
    ``GridSampler``) or ``"nsga2"`` (``NSGAIISampler`` over the same values, for
    ``n_trials`` trials; repeated configurations are read back, not rerun).
    """

    def __init__(self, storage: str, name: str, space: dict[str, list], *, fingerprint: dict, settings: dict,
                 sampler: str = "grid", seed: int = 0):
        import optuna

        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}.")
        self.space, self.kind, self.url = {k: list(v) for k, v in space.items()}, sampler, storage
        self.sampler = (optuna.samplers.GridSampler(self.space, seed=seed) if sampler == "grid"
                        else optuna.samplers.NSGAIISampler(seed=seed))
        with quiet_optuna():
            self.study = optuna.create_study(storage=open_storage(storage), study_name=name, sampler=self.sampler,
                                             directions=list(DIRECTIONS), load_if_exists=True)
        self._claim("fingerprint", fingerprint, "model weights or data")
        self._claim("settings", settings, "settings")

    def _claim(self, attr: str, mine: dict, what: str) -> None:
        """Set user attribute ``attr`` if the study has none; else it must equal ``mine``."""
        theirs = self.study.user_attrs.get(attr)
        if theirs is None:
            self.study.set_user_attr(attr, mine)
            theirs = self.study.user_attrs.get(attr, mine)  # another worker may have set it first
        if theirs != mine:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            lines = "; ".join(f"{k}: study {theirs.get(k)!r}, this worker {mine.get(k)!r}" for k in diff)
            raise ValueError(
                f"Study {self.study.study_name!r} holds a sweep with other {what} ({lines}). Every worker must load "
                "the same model and build the same data with the same settings; or give another study name (--study).")

    @property
    def public_url(self) -> str:
        """The storage URL with its password hidden (for files and logs)."""
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)

    def points(self) -> list[dict]:
        """Every grid point, in grid order (the first parameter varies slowest)."""
        import itertools

        names = list(self.space)
        return [dict(zip(names, vals)) for vals in itertools.product(*self.space.values())]

    def _trials(self):
        return self.study.get_trials(deepcopy=False)

    def rows(self) -> list[dict]:
        """The row of every finished configuration of this study (first finished first)."""
        done = [t for t in self._trials() if "row" in t.user_attrs and t.state.is_finished()]
        done.sort(key=lambda t: (t.user_attrs["row"].get("finished") or 0.0, t.number))
        out, seen = [], set()
        for t in done:
            row = t.user_attrs["row"]
            if row["key"] not in seen:
                seen.add(row["key"])
                out.append(row)
        return out

    def _requeue_and_count(self) -> tuple[int, int, int, int]:
        """Fail stale trials, queue again grid points whose trial failed without a row;
        return (points with no trial yet, WAITING trials, RUNNING trials, done trials)."""
        import optuna
        from optuna.trial import TrialState

        optuna.storages.fail_stale_trials(self.study)
        trials = list(self._trials())
        n_done = sum("row" in t.user_attrs and t.state.is_finished() for t in trials)
        if self.kind != "grid":
            by = lambda s: sum(t.state == s for t in trials)  # noqa: E731
            return 0, by(TrialState.WAITING), by(TrialState.RUNNING), n_done
        status: dict[int, str] = {}
        lost = {}
        rank = {"done": 3, "WAITING": 2, "RUNNING": 2}
        for t in trials:
            gid = t.system_attrs.get("grid_id")
            if gid is None:  # (the study's settings fix its grid: every grid_id is of this space)
                continue
            s = "done" if ("row" in t.user_attrs and t.state.is_finished()) else t.state.name
            if s == "FAIL":
                lost[gid] = t
            elif rank.get(s, 0) > rank.get(status.get(gid, ""), 0):
                status[gid] = s
        for gid, t in lost.items():
            if gid not in status:
                self.study.add_trial(optuna.trial.create_trial(
                    state=TrialState.WAITING,
                    system_attrs={"grid_id": gid, "search_space": t.system_attrs["search_space"], "retry_of": t.number}))
                status[gid] = "WAITING"
        todo = len(self.points()) - len(status)
        count = lambda s: sum(v == s for v in status.values())  # noqa: E731
        return todo, count("WAITING"), count("RUNNING"), n_done

    def work(self, objective: Callable[[dict, Any], tuple[dict, bool]], *, wait: bool = True,
             n_trials: int | None = None, on_trial: Callable[[dict, bool], None] | None = None) -> int:
        """Run trials until the sweep is done; return how many ran here.

        ``n_trials`` is the study's budget: no trial starts once that many configurations
        are done (None: every grid point; NSGA-II needs a number). With ``wait=True`` this
        also waits for trials that other workers are running, and reruns those whose
        worker died, so that every grid point is done on return; with ``wait=False`` it
        returns when nothing is left to start. ``on_trial(row, new)`` is
        called after each trial (``new``: trained here, not read back).
        """
        ran = 0
        with quiet_optuna():
            while True:
                todo, waiting, running, done = self._requeue_and_count()
                if n_trials is not None and done + (running if self.kind == "nsga2" else 0) >= n_trials:
                    break
                if self.kind == "grid" and not (todo or waiting):
                    if not (running and wait):
                        break
                    time.sleep(HEARTBEAT_S)
                    continue
                self.study.optimize(lambda t: self._run(t, objective, on_trial), n_trials=1,
                                    catch=(Diverged,), gc_after_trial=False)
                ran += 1
        return ran

    def _run(self, trial, objective, on_trial) -> tuple[float, float, float]:
        import optuna

        params = {k: trial.suggest_categorical(k, v) for k, v in self.space.items()}
        if self.kind == "grid" and self._taken(trial.number, params):
            raise optuna.TrialPruned("grid point taken by an earlier trial")  # a race of two workers: no rerun
        row, new = objective(params, trial)
        if new:
            row = {**row, "trial": trial.number, "worker": worker_name()}
        trial.set_user_attr("row", row)
        if on_trial is not None:
            on_trial(row, new)
        if row.get("error") is not None:
            raise Diverged(row["error"])  # kept as FAIL with its row: done, not rerun
        return tuple(float(row[f"train_{m}"]) for m in ("effectiveness", "faithfulness", "minimality"))

    def _taken(self, number: int, params: dict) -> bool:
        """Another worker's lower-numbered trial holds this grid point (running, or done with
        its row): two workers asking at once can be handed the same point, and the lower
        number keeps it, so each point is trained once and has one COMPLETE trial."""
        return any(t.number < number and t.params == params
                   and (t.state.name == "RUNNING" or ("row" in t.user_attrs and t.state.is_finished()))
                   for t in self._trials())

    def find(self, key: str) -> dict | None:
        """The row of configuration ``key`` if any trial of this study finished it."""
        for t in self._trials():
            row = t.user_attrs.get("row")
            if row is not None and row["key"] == key and t.state.is_finished():
                return row
        return None


class Diverged(Exception):
    """A configuration whose training diverged (its row is kept, measures empty)."""


def finished_rows(storage: str, exclude: str | None = None) -> dict[str, dict]:
    """key -> row of every finished configuration in every study of ``storage`` (a cache)."""
    import optuna

    st = open_storage(storage)
    out: dict[str, dict] = {}
    for s in st.get_all_studies():
        if s.study_name == exclude:
            continue
        with quiet_optuna():
            trials = optuna.load_study(study_name=s.study_name, storage=st).get_trials(deepcopy=False)
        for t in trials:
            row = t.user_attrs.get("row")
            if row is not None and t.state.is_finished():
                out.setdefault(row["key"], row)
    return out


def study_names(storage: str) -> Sequence[str]:
    """Names of the studies in ``storage``."""
    return [s.study_name for s in open_storage(storage).get_all_studies()]
