"""The shared machinery of learnable interventions (seed paper 003, Sec. 3.1-3.2).

An intervention targets the intervention points K = L x I x S (layers x token positions x
sites) and replaces each activation vector h_{l,i}^(s) by a steered one h~ that depends on
learnable parameters theta and a run-time strength beta. beta = 0 is exactly the identity
(f~^0 = f) and flipping the sign of beta reverses the intervention's direction.

``Intervention`` holds the location spec and the hooks; a subclass only says how one
site's selected activations change (``edit``). Sites are ``attn_out``, ``mlp_out``,
``resid_post`` (a d_model vector per position), per-head ``z`` (n_heads x d_head per
position, so a location there is (layer, pos, head)) and per-KV-head ``v`` (the value
vectors, n_kv_heads x d_head per position: 3 KV heads for SmolLM2's 9 query heads; Fig. 7). Positions are ``"all"``, ``"last"``
or a list of ints; on prompts of mixed lengths, slots of a position axis bound per prompt
(``mechsteer.interventions.positions``: ``for_dataset``, ``token_index``, ``bind``).

beta may be a float or a ``(batch,)`` tensor: one beta per prompt. A training step stacks
the prompts twice and runs beta = [+1]*B + [-1]*B as ONE batch (``plus_minus_batch``).

Hooks return a new tensor (TransformerLens style) and run through ``mechsteer.sites.hooked``,
so they are removed on every exit path and must all fire. ``resid_mid`` is refused (the
site module's note on it says why).

Generation. ``model.generate`` on the bridge calls the model once per new token: first on
the whole prompt, then, with ``use_past_kv_cache=True`` (its default), on the one newest
token (the hooks see seq length 1), or, with ``use_past_kv_cache=False``, on the whole
sequence so far (lengths n, n+1, ...). Steer it inside ``apply(model, beta,
generation=True)``; there position-bound interventions (ActivScalar, SteerVec) steer the
PROMPT's positions: the first forward must have n_pos tokens, later cached one-token
steps are left unsteered, and uncached reruns steer positions [0, n) of the prompt again
("last" = the prompt's last token). Cached and uncached generation thus run the same
steered model. DynScalar with ``positions="all"`` steers every position, generated ones
included; with "last" or a list it steers those positions of the prompt. Outside
``generation=True`` the strict rule stays: a position-bound intervention refuses a
forward of any other length. Use one ``with`` block per ``generate`` call (a block tells a
new prompt from a generation step by its length; a one-token prompt after a cached
generation in the same block would pass for a cached step). ``generation="auto"`` lifts
that limit: runs outside ``model.generate`` are plain runs (any lengths), and each
``generate`` call in the block gets the rule afresh. Fixed-parameter subclasses
(``learnable = False``, e.g. ``mechsteer.fv.FunctionVector``) hold buffers, no ``params``.

>>> from mechsteer.interventions import ActivScalar
>>> from mechsteer.tiny import tiny_model
>>> model = tiny_model("gpt2")
>>> tokens = model.to_tokens("The capital of France is")
>>> iv = ActivScalar.for_model(model, sites=["attn_out"], n_pos=tokens.shape[1])
>>> with iv.apply(model, beta=0.0):
...     logits = model(tokens)
>>> bool((logits == model(tokens)).all())
True
>>> with iv.apply(model, beta=0.0, generation=True):
...     text = model.generate("The capital of France is", max_new_tokens=3, do_sample=False, verbose=False)
>>> text == model.generate("The capital of France is", max_new_tokens=3, do_sample=False, verbose=False)
True
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechsteer._validate import finite_float, positive_int
from mechsteer.interventions import positions as positions_
from mechsteer.interventions.positions import as_index
from mechsteer.interventions.scope import watch_generate
from mechsteer.sites import get_site, hook_name, hooked, sites_for

ALLOWED_SITES = sites_for("intervene")  # the site module says where an intervention may edit
DEFAULT_INIT_STD = 1e-5  # App. A.1: parameters start as Gaussian noise N(0, 1e-5), read as std 1e-5
INIT_READINGS = {"std": 1e-5, "var": 1e-5 ** 0.5}  # App. A.1's N(0, 1e-5): 1e-5 as the std, or as the variance


def check_beta(beta):
    """``beta`` if it is a finite number or a scalar / ``(batch,)`` tensor of finite numbers;
    else ValueError/TypeError naming beta (a NaN beta would turn every steered logit into NaN)."""
    if not isinstance(beta, Tensor):
        return finite_float("beta", beta)
    if beta.ndim > 1:
        raise ValueError(f"beta has shape {tuple(beta.shape)}; expected a scalar or (batch,).")
    if beta.dtype == torch.bool or beta.is_complex():
        raise TypeError(f"beta must be a number or a float tensor, got a {beta.dtype} tensor.")
    if not bool(torch.isfinite(beta.detach()).all()):
        raise ValueError(f"beta must be finite, got {beta.detach().cpu().tolist()}.")
    return beta


def _check_sites(sites: Sequence[str]) -> tuple[str, ...]:
    if isinstance(sites, str):
        sites = [sites]
    sites = tuple(sites)
    if not sites:
        raise ValueError("sites is empty; give at least one of " + ", ".join(ALLOWED_SITES) + ".")
    for s in sites:
        site = get_site(s)  # unknown names get the "did you mean" error
        if s not in ALLOWED_SITES:
            why = f" {site.note}" if site.note else ""
            raise ValueError(f"Site {s!r} cannot be intervened on; choose from {ALLOWED_SITES}.{why}")
    if len(set(sites)) != len(sites):
        raise ValueError(f"sites has duplicates: {sites}.")
    return sites


class Intervention(torch.nn.Module):
    """Base class: location spec (sites x layers x positions), parameters and hooks.

    Subclasses set ``position_bound`` and implement ``param_shape`` and ``edit``.
    Position-bound ones need ``n_pos`` for ``positions="all"`` or a list, and then refuse
    prompts of any other length; with ``positions="last"`` and no ``n_pos`` they run on
    any length. Parameters live in ``self.params[site]``, layer axis first (in the order
    of ``self.layers``).
    Build from shapes (``n_layers``, ``d_model``, ``n_heads``, ``d_head``, ``n_pos``) or
    from a model with ``for_model``.
    """

    position_bound: bool = True
    learnable: bool = True  # False: fixed values in buffers, no params (mechsteer.fv's FunctionVector)

    def __init__(
        self,
        sites: Sequence[str] = ("attn_out", "mlp_out"),
        layers: Sequence[int] | None = None,  # None: every layer
        positions: str | Sequence[int] = "all",  # "all", "last" or a list of ints
        *,
        n_layers: int,  # layers of the model
        d_model: int,
        n_heads: int | None = None,  # needed for site "z"
        d_head: int | None = None,  # needed for sites "z" and "v"
        n_kv_heads: int | None = None,  # site "v" (GQA); None: n_heads
        n_pos: int | None = None,  # prompt length (position-bound interventions)
        slots: Sequence[str] | None = None,  # position-axis labels, one parameter each (positions.py)
        init_std: float | str = DEFAULT_INIT_STD,  # std of the Gaussian init, or "std" / "var" (INIT_READINGS)
        seed: int = 0,  # seeds the init
    ):
        super().__init__()
        n_layers, d_model = positive_int("n_layers", n_layers), positive_int("d_model", d_model)
        n_heads = positive_int("n_heads", n_heads, allow_none=True)
        d_head = positive_int("d_head", d_head, allow_none=True)
        n_pos = positive_int("n_pos", n_pos, allow_none=True)
        n_kv_heads = positive_int("n_kv_heads", n_kv_heads, allow_none=True) or n_heads
        if isinstance(init_std, str) and init_std not in INIT_READINGS:
            raise ValueError(f"init_std={init_std!r}: give a number or one of {list(INIT_READINGS)} (App. A.1's readings).")
        init_std = finite_float("init_std", INIT_READINGS[init_std] if isinstance(init_std, str) else init_std)
        if init_std < 0:
            raise ValueError(f"init_std must be >= 0 (the std of the Gaussian init), got {init_std}.")
        seed = as_index("seed", seed)
        self.sites = _check_sites(sites)
        if isinstance(layers, (str, numbers.Number)):
            raise TypeError(f"layers must be a list of ints (or None for every layer), got {layers!r}.")
        self.layers = tuple(range(n_layers)) if layers is None else tuple(as_index("layers", x) for x in layers)
        if (
            not self.layers
            or any(not 0 <= x < n_layers for x in self.layers)
            or len(set(self.layers)) != len(self.layers)
        ):
            raise ValueError(f"layers {layers!r} must be distinct ints in 0..{n_layers - 1}.")
        for s, need in (("z", n_heads), ("v", n_kv_heads)):
            if s in self.sites and (need is None or d_head is None):
                raise ValueError(f"Site {s!r} needs n_heads (n_kv_heads) and d_head; pass them or use for_model(model, ...).")
        self.n_layers, self.d_model, self.n_heads, self.d_head = n_layers, d_model, n_heads, d_head
        self.n_kv_heads = n_kv_heads
        self.n_pos, self.init_std, self.seed = n_pos, init_std, seed
        self.slots = positions_.check_slots(slots)
        if self.slots is not None:
            if positions != "all" or n_pos not in (None, len(self.slots)):
                raise ValueError(f"slots give the positions (one per slot): leave positions='all' and n_pos=None, "
                                 f"got positions={positions!r}, n_pos={n_pos}.")
            self.n_pos = n_pos = len(self.slots)
        self.positions = positions_.check_positions(self, positions, n_pos)
        self._bound: Tensor | None = None  # where of the batch about to run (bind)
        gen = torch.Generator().manual_seed(seed)
        self.params = torch.nn.ParameterDict(
            {s: torch.nn.Parameter(torch.randn(self.param_shape(s), generator=gen) * init_std) for s in self.sites}
            if self.learnable
            else {}
        )

    @classmethod
    def for_model(cls, model, sites=("attn_out", "mlp_out"), layers=None, positions="all", n_pos=None, **kwargs):
        """Build for ``model``'s shapes (n_layers, d_model, n_heads, d_head from ``model.cfg``)."""
        cfg = model.cfg
        return cls(sites, layers, positions, n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads,
                   d_head=cfg.d_head, n_kv_heads=getattr(cfg, "n_key_value_heads", None), n_pos=n_pos, **kwargs)

    @classmethod
    def for_dataset(cls, model, ds, sites=("attn_out", "mlp_out"), layers=None, positions="all", *,
                    axis: str = "auto", **kwargs):
        """Build for ``model`` and the prompts of ``ds``: position-bound ``positions="all"``
        gets one parameter per entry of ``ds.position_axis(axis)`` (``"auto"``: token
        columns for equal lengths, as ``for_model(n_pos=ds.n_pos)``; else named or
        end-relative slots); other kinds ``n_pos=ds.n_pos`` (None for "last" on mixed lengths).

        >>> from mechsteer.tasks.base import build_dataset
        >>> from mechsteer.tasks.ccc import ccc_candidates
        >>> from mechsteer.tiny import tiny_model
        >>> model = tiny_model("llama")
        >>> ds = build_dataset("ccc", model, ccc_candidates(0, templates=[0, 1])[:8], n=None, seed=0, same_length=False)
        >>> from mechsteer.interventions import ActivScalar
        >>> ActivScalar.for_dataset(model, ds, sites=["mlp_out"], axis="end").slots[-3:]
        ('end-2', 'end-1', 'end')
        """
        return positions_.for_dataset(cls, model, ds, sites, layers, positions, axis, **kwargs)

    def token_index(self, ds) -> Int[Tensor, "batch n_sel"] | None:
        """Per prompt of ``ds``, the token index of each selected position (-1: absent), for
        ``bind``; None when an unbound forward is already exact (no pads, no slots)."""
        return positions_.token_index(self, ds)

    @contextlib.contextmanager
    def bind(self, where: Int[Tensor, "batch n_sel"] | None) -> Iterator["Intervention"]:
        """Inside the block, prompt b of each forward edits its tokens ``where[b]`` (slot j's
        parameter at token where[b, j]; -1 absent); ``None``: the plain column path."""
        prev, self._bound = self._bound, positions_.check_where(where, self.n_sel_pos or 1)
        try:
            yield self
        finally:
            self._bound = prev

    # --- shapes -------------------------------------------------------------------
    @property
    def n_sel_pos(self) -> int:
        """Number of positions this intervention holds parameters for."""
        if self.positions == "all":
            return self.n_pos
        return 1 if self.positions == "last" else len(self.positions)

    def site_tail(self, site: str) -> tuple[int, ...]:
        """Shape of one position's activation at ``site``: (d_model,), (n_heads, d_head) for z
        or (n_kv_heads, d_head) for v."""
        return {"z": (self.n_heads, self.d_head), "v": (self.n_kv_heads, self.d_head)}.get(site, (self.d_model,))

    def param_shape(self, site: str) -> tuple[int, ...]:
        """Shape of ``site``'s parameter tensor (set by the subclass)."""
        raise NotImplementedError

    @property
    def n_params(self) -> int:
        """Number of learnable parameters |vec(theta)|."""
        return sum(p.numel() for p in self.params.values())

    # --- running ------------------------------------------------------------------
    def edit(
        self, site: str, li: int, h: Float[Tensor, "batch pos *tail"], beta: Float[Tensor, " batch"]
    ) -> Float[Tensor, "batch pos *tail"]:
        """h~ for the selected positions: h (batch, pos_sel, *tail), beta (batch,)."""
        raise NotImplementedError

    def _steer(self, site: str, li: int, x: Tensor, b: Tensor) -> Tensor:
        where = positions_.where_for_forward(self, self._bound, x)
        if where is not None:  # each prompt at its own tokens (positions.py)
            return positions_.steer_at(x, where, lambda h: self.edit(site, li, h, b))
        idx = positions_.column_index(self, x.shape[1], x.device)
        if idx is None:
            return self.edit(site, li, x, b)  # (B, T, *tail)
        return x.index_copy(1, idx, self.edit(site, li, x[:, idx], b))

    def _generation_step(self, state: dict, n: int) -> str:
        """Classify a forward of ``n`` tokens in a generation: "prompt", "cached" or "rerun"."""
        prompt, last = state.get("prompt"), state.get("last")
        state["last"] = n
        if prompt is not None and n == 1 and last in (1, prompt):
            return "cached"  # KV cache: one new token
        if prompt is not None and last is not None and last >= prompt and n == last + 1:
            return "rerun"  # no KV cache: the whole sequence again, one token longer
        if self.position_bound and self.n_pos is not None and self.slots is None and self._bound is None and n != self.n_pos:
            raise ValueError(
                f"{type(self).__name__} was built for prompts of {self.n_pos} tokens, got a generation prompt "
                f"of {n}: the first forward of generate() is the prompt and must have n_pos tokens. Use such "
                "a prompt, or DynScalar for any length."
            )
        state["prompt"] = n
        return "prompt"

    def _steer_step(self, site: str, li: int, x: Tensor, b: Tensor, step: str, n: int) -> Tensor:
        """A generation forward under this intervention: ``step`` from ``_generation_step``,
        ``n`` the prompt's length. Position-bound interventions steer the prompt's positions
        (cached steps untouched), DynScalar with positions="all" every token."""
        if step == "prompt":
            return self._steer(site, li, x, b)
        if not self.position_bound and self.positions == "all":
            return self.edit(site, li, x, b)  # DynScalar: every token, generated ones too
        if step == "cached":
            return x
        return torch.cat([self._steer(site, li, x[:, :n], b), x[:, n:]], dim=1)  # rerun: the prompt again

    def _hook(self, site: str, li: int, beta, generation: bool = False, scope: dict[str, int] | None = None):
        state: dict[str, int] = {}  # generation: prompt length and last forward's length

        def fn(x: Tensor, hook) -> Tensor:
            b = torch.as_tensor(beta, dtype=x.dtype, device=x.device)
            if b.ndim == 0:
                b = b.expand(x.shape[0])
            elif b.shape != (x.shape[0],):
                raise ValueError(
                    f"beta has shape {tuple(b.shape)}; expected a scalar or ({x.shape[0]},), one per prompt."
                )
            if scope is not None:  # generation="auto": the rule inside model.generate only
                if not scope["active"]:
                    return self._steer(site, li, x, b)
                if state.get("call") != scope["call"]:  # a new generate call: forget the last one
                    state.clear()
                    state["call"] = scope["call"]
            elif not generation:
                return self._steer(site, li, x, b)
            step = self._generation_step(state, x.shape[1])
            return self._steer_step(site, li, x, b, step, state["prompt"])

        return fn

    def check_model(self, model) -> None:
        """ValueError unless ``model`` has the shapes this intervention was built for."""
        cfg = model.cfg
        want = {"n_layers": self.n_layers, "d_model": self.d_model}
        if "z" in self.sites:
            want.update(n_heads=self.n_heads, d_head=self.d_head)
        if "v" in self.sites:
            want.update(n_key_value_heads=self.n_kv_heads, d_head=self.d_head)
        have = {k: getattr(cfg, k, None) for k in want}
        if "n_key_value_heads" in want:  # MHA configs leave it None: one KV head per query head
            have["n_key_value_heads"] = have["n_key_value_heads"] or cfg.n_heads
        bad = {k: (v, have[k]) for k, v in want.items() if have[k] != v}
        if bad:
            raise ValueError(f"Model shapes differ from this intervention's (built, model): {bad}.")

    @contextlib.contextmanager
    def apply(
        self,
        model,
        beta: float | int | Float[Tensor, "*b"] = 1.0,
        *,
        check_fired: bool = True,
        generation: bool | str = False,
        where: Int[Tensor, "batch n_sel"] | None = None,
    ) -> Iterator[dict[str, int]]:
        """Run ``model`` steered at strength ``beta`` (a float or one per prompt) inside the block.

        ``generation=True`` for ``model.generate`` (see the module docstring: position-bound
        interventions steer the prompt, DynScalar every token); ``"auto"``: plain runs and
        ``model.generate`` calls in one block, each told apart. Hooks are scoped and checked
        by ``mechsteer.sites.hooked``; yields its call counts. ``where``: ``bind`` it in the block.
        """
        if not (isinstance(generation, bool) or generation == "auto"):
            raise ValueError(f"generation must be False, True or 'auto', got {generation!r}.")
        beta = check_beta(beta)
        self.check_model(model)
        with contextlib.ExitStack() as stack:
            scope = stack.enter_context(watch_generate(model)) if generation == "auto" else None
            if where is not None:
                stack.enter_context(self.bind(where))
            hooks = [
                (hook_name(s, l, model), self._hook(s, li, beta, generation is True, scope))
                for s in self.sites
                for li, l in enumerate(self.layers)
            ]
            calls = stack.enter_context(hooked(model, hooks, check_fired=check_fired))
            yield calls

    def forward(
        self, model, tokens: Int[Tensor, "batch pos"], beta: float | int | Float[Tensor, "*b"] = 1.0,
        *, last_only: bool = False, where: Int[Tensor, "batch n_sel"] | None = None,
    ) -> Float[Tensor, "batch out_pos vocab"]:
        """Logits f~^beta(x) of ``model`` on ``tokens`` under this intervention; ``last_only``:
        the last column's alone (``(batch, 1, vocab)``; right-padded prompts read their own
        last tokens with ``objective.answer_logits``); ``where``: bound (``bind``)."""
        with self.apply(model, beta, where=where):
            return model(tokens, logits_to_keep=1) if last_only else model(tokens)

    def extra_repr(self) -> str:
        where = f"slots={list(self.slots)}" if self.slots is not None else f"positions={self.positions!r}, n_pos={self.n_pos}"
        return f"sites={self.sites}, layers={self.layers}, {where}, n_params={self.n_params}"


def steer(
    model, intervention: Intervention, beta: float | int | Float[Tensor, "*b"] = 1.0, *, generation: bool = False
):
    """Context manager: run ``model`` with ``intervention`` at strength ``beta``
    (``generation=True`` around ``model.generate``)."""
    return intervention.apply(model, beta, generation=generation)


def plus_minus_batch(tokens: Int[Tensor, "batch pos"]) -> tuple[Int[Tensor, "batch2 pos"], Float[Tensor, " batch2"]]:
    """Stack the prompts twice with beta = [+1]*B + [-1]*B, for one pass per training step.

    >>> toks, beta = plus_minus_batch(torch.zeros(2, 3, dtype=torch.long))
    >>> toks.shape, beta.tolist()
    (torch.Size([4, 3]), [1.0, 1.0, -1.0, -1.0])
    """
    b = tokens.shape[0]
    beta = torch.cat([torch.ones(b), -torch.ones(b)]).to(tokens.device)
    return torch.cat([tokens, tokens]), beta
