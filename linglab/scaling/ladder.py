"""The ladder of the scaling-law sweep (SPEC §4): the grid, the rung shapes, the cost model and the plan.

    grid = load_grid("grid.toml")                # the default SweepGrid, then a TOML file's keys
    runs, notes = plan_runs(grid)                # one PlannedRun per (axis, budget, shape, LR/batch multiplier)
    print("\n".join(describe_plan(runs, notes, grid)))   # what `linglab scaling sweep --dry-run` prints

A run is one compute budget C and one model: it trains D = C / M tokens (M = non-embedding training FLOPs per
token, active experts only; SPEC §4), rounded to whole optimizer steps, on the embedded arithmetic corpus
(`linglab.scaling.sweep` trains it). Axes, one at a time:

  shape        IsoFLOP profiles: at each budget, a few rungs of one width/depth ladder around (a multiple of) the
               published MoE M_opt(C). Gives the loss-vs-compute frontier, L(N, D), and optimal LR/batch if the grid
               varies them.
  activation   one rung per budget, routed experts E varied at fixed top-k (A = (k + 1) / (E + 1)), plus a dense
               model of the same active FFN width: the efficiency leverage EL = C_dense / C_MoE at equal loss.
  granularity  expert width 2 d_model / G, with E and k scaled by G so A stays near the base 5/17.

LR and batch: the batch follows the published B_opt(C) (1000-3800 tokens here, 8-30 sequences of 128: a sensible
range at this scale). The LR is fixed at 3e-3, the tiny preset's: the published eta_opt(C), in Ling's units, asks
for 0.012-0.017 here, several times what trains the tiny preset well; whether it is worse at these budgets has not
been measured in a committed sweep. Set `lr_multipliers` in a grid file to measure eta_opt(C); `fit` then fits it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from linglab.config import Config, load_config, read_toml
from linglab.corpora import CORPORA
from linglab.errors import LinglabError
from linglab.flops import flops_per_token
from linglab.plots import si
from linglab.scaling.laws import (
    OPTIMAL_BATCH_TOKENS,
    OPTIMAL_LR,
    PowerLaw,
    activation_ratio,
    compute_optimal,
    non_embedding_flops_per_token,
)

AXES = ("shape", "activation", "granularity")
BASE_PRESET = "tiny"  # rope_theta 10000 and whole-head RoPE: what the arithmetic corpus needs (docs/training.md)
ASPECT = 40  # d_model / layers of every rung (tiny: 32, the released Ling models: ~100); keeps M ~2x apart per rung
# The MoE of every rung: the tiny preset's router (16 experts, top-4 + 1 shared, 4 groups, 2 kept, first layer
# dense with FFN 3d) and experts of width d/2, so G = 4 and A = 5/17 everywhere on the shape axis.
BASE_EXPERTS, BASE_TOP_K, BASE_G = 16, 4, 4
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok", "first_k_dense_replace")
# Cost model of --dry-run and the first ETA, calibrated on this 2-core CPU (fp32, no MTP): seconds =
# tokens * FLOPs/token / rate + steps * per-step overhead + per-run overhead (model, optimizer, the trainer's
# matmul-peak probe, held-out eval). The ETA then rescales by the measured/estimated ratio of finished runs.
CPU_FLOPS = 60e9  # measured 56-70 GFLOP/s on widths 64-128 at 8-30 sequences per step
STEP_OVERHEAD_S = 0.013  # measured 11-14 ms per step (Python, MoE routing, AdamW) on the same shapes
RUN_OVERHEAD_S = 5.0
CORPUS_S_PER_DOC = 1.5e-4  # building the embedded corpus and its packed datasets: measured 28 s for 200000 documents
CORPUS_TOKENS_PER_DOC = 51  # embedded-corpus document length with the default tiers (2.05M tokens in 40000)
NAMED_CORPUS_S = 30.0  # a named corpus (stdlib): reading, tokenizer training and packing, measured ~20 s
BYTES_PER_TOKEN = 3.0  # stdlib code under the trained byte-level BPE: measured 3.0 at vocab 2048, 3.4 at 4096


class SweepError(LinglabError):
    """A bad grid, axis, budget, results file or fit file (raised by every module of linglab.scaling)."""


# ---------------------------------------------------------------- the grid


@dataclass
class SweepGrid:
    """The default sweep: 26 runs, ~27 minutes as `--dry-run` estimates for a 2-core CPU (an uncontended run timed
    at 0.75x its estimate). `--grid FILE` (TOML, top-level keys) overrides any field."""

    axes: list[str] = field(default_factory=lambda: ["shape", "activation"])
    budgets: list[float] = field(default_factory=lambda: [3e11, 6e11, 1.2e12, 2.5e12, 5e12, 1e13])  # shape axis, FLOPs: 33x
    ladder: list[int] = field(default_factory=lambda: [64, 96, 128, 160, 192, 256])  # rung widths; depth = width / ASPECT
    sizes_per_budget: int = 3  # rungs per budget on the shape axis (an IsoFLOP profile)
    # The profile is centred on centre_scale x the published MoE M_opt(C): the law's exponent, a larger coefficient.
    # At these budgets the law itself asks for M ~ 1e5-1e6 (20K-130K parameters), at or below the ladder's bottom.
    centre_scale: float = 10.0
    # Activation and granularity axes: not shape budgets, where a base-MoE run would repeat a shape-axis run.
    axis_budgets: list[float] = field(default_factory=lambda: [1e12, 3e12])
    num_experts: list[int] = field(default_factory=lambda: [8, 16, 64])  # activation axis, top-4 + 1 shared: A 0.56-0.08
    granularities: list[int] = field(default_factory=lambda: [2, 4, 8])  # granularity axis
    # A fixed peak LR (why: the module docstring), "published" = eta_opt(C) of SPEC §4, or a law of your own fit,
    # {coef = .., exponent = ..} = coef * C^exponent (what `fit` writes as laws.lr; the wind tunnel's ladder uses one).
    lr: float | str | dict = 3e-3
    batch_tokens: float | str | dict = "published"  # the same three forms for B_opt(C); rounded to whole sequences
    lr_multipliers: list[float] = field(default_factory=lambda: [1.0])  # shape axis: >1 value to fit eta_opt(C)
    batch_multipliers: list[float] = field(default_factory=lambda: [1.0])  # shape axis: >1 value to fit B_opt(C)
    # Shape-axis budgets that get the multipliers above (the others train at multiplier 1 only); [] = every budget.
    hyper_budgets: list[float] = field(default_factory=list)
    corpus: str = ""  # "" = the embedded arithmetic corpus; a named real-text corpus of linglab.corpora ("stdlib")
    vocab_size: int = 512  # the trained tokenizer's (the tiny preset's)
    heldout_tokens: int = 65536  # corpus: held-out tokens scored for each run's held-out loss
    warmup_frac: float = 0.05
    decay_frac: float = 0.3  # WSD, as the tiny preset: each run decays, so its final loss is its budget's
    min_steps: int = 50  # a run shorter than this is dropped from the plan (mostly warmup and decay)
    seq_len: int = 128
    num_documents: int = 100000  # ~5M tokens: the largest default run reads about half of them, none twice
    eval_problems: int = 200  # held-out problems per tier for the held-out loss
    seed: int = 0

    def validate(self) -> None:
        """Types first (a grid file can hold anything), then ranges: one line naming the key, never a traceback."""
        defaults = SweepGrid()
        rule = "'published', a positive number or {coef = positive number, exponent = number}"
        special = {"lr": (_is_rule, rule), "batch_tokens": (_is_rule, rule),
                   "warmup_frac": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
                   "decay_frac": (lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
                   "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
                   "hyper_budgets": (lambda v: isinstance(v, list) and all(_fits(b, 1.0) for b in v),
                                     "a list of positive numbers (shape-axis budgets; [] = all)"),
                   "corpus": (lambda v: v in ("", *CORPORA), f"'' or one of {', '.join(CORPORA)}")}
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), getattr(defaults, f.name)
            if f.name in special:
                check, wanted = special[f.name]
                ok = check(value)
            elif isinstance(default, list):
                ok = isinstance(value, list) and bool(value) and all(_fits(v, default[0]) for v in value)
                wanted = f"a non-empty list of {_kind(default[0])}s"
            else:
                ok, wanted = _fits(value, default), f"a {_kind(default)}"
            if not ok:
                raise SweepError(f"scaling grid: {f.name} must be {wanted}, got {value!r}")
        for axis in self.axes:
            check_axis(axis)
        if any(w % 32 for w in self.ladder):
            raise SweepError(f"scaling grid: ladder widths must be multiples of 32 (the head width), got {self.ladder}")
        if missing := [b for b in self.hyper_budgets if b not in self.budgets]:
            raise SweepError(f"scaling grid: hyper_budgets [{', '.join(f'{b:g}' for b in missing)}] are not in budgets "
                             f"[{', '.join(f'{b:g}' for b in self.budgets)}]")
        if self.vocab_size < 258:
            raise SweepError(f"scaling grid: vocab_size must be >= 258 (256 bytes + eos + pad), got {self.vocab_size}")
        if self.sizes_per_budget > len(self.ladder):
            raise SweepError(f"scaling grid: sizes_per_budget ({self.sizes_per_budget}) exceeds the ladder's {len(self.ladder)} rungs")


def _fits(value, default) -> bool:
    """value has default's type (an int passes for a float) and, if a number, is finite and positive."""
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool) and value > 0
    return is_number(value) and math.isfinite(value) and value > 0


def _is_rule(value) -> bool:
    """An LR or batch rule of a grid: "published", a positive number, or a power law {coef, exponent}."""
    if isinstance(value, dict):
        return (set(value) == {"coef", "exponent"} and _fits(value["coef"], 1.0) and is_number(value["exponent"])
                and math.isfinite(value["exponent"]))
    return value == "published" or _fits(value, 1.0)


def _rule_at(rule, published: PowerLaw, budget: float) -> float:
    """The value of an LR or batch rule at compute `budget`."""
    if rule == "published":
        return float(published.predict(budget))
    if isinstance(rule, dict):
        return float(PowerLaw(rule["coef"], rule["exponent"]).predict(budget))
    return float(rule)


def _kind(default) -> str:
    return "string" if isinstance(default, str) else "positive integer" if isinstance(default, int) else "positive number"


def is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def check_axis(axis: str) -> str:
    if axis not in AXES:
        raise SweepError(f"scaling: unknown axis {axis!r} (choose from: {', '.join(AXES)})")
    return axis


def load_grid(path: str | Path | None = None, budgets: list[float] | None = None, axes: list[str] | None = None) -> SweepGrid:
    """The default grid, then a TOML file's top-level keys, then --budgets / --axis; validated."""
    grid = SweepGrid()
    if path is not None:
        tree = read_toml(path, "scaling: grid", SweepError)
        keys = [f.name for f in dataclasses.fields(grid)]
        for key, value in tree.items():
            if key not in keys:
                raise SweepError(f"scaling: unknown grid key '{key}' in {path} (keys: {', '.join(keys)})")
            setattr(grid, key, value)
    if budgets is not None:
        grid.budgets = list(budgets)
    if axes is not None:
        grid.axes = list(axes)
    grid.validate()
    return grid


# ---------------------------------------------------------------- shapes


def head_dim_for(hidden: int) -> int:
    """32-wide heads on the CPU ladder (the tiny preset's); 128, as Ling's, from d_model 1024 up."""
    return 32 if hidden < 1024 else 128


def rung_shape(hidden: int) -> dict:
    """ModelConfig fields of the MoE rung of width `hidden`: depth hidden / ASPECT (at least 2, so one layer is MoE),
    GQA 2:1 when the head count is even (else MHA), dense FFN 3d, the base experts of width d/2, MTP off.

    MTP is off because C counts the main model only (SPEC §4): a run with MTP would spend ~(1 + 1/layers) C.
    """
    heads = hidden // head_dim_for(hidden)
    return dict(hidden_size=hidden, num_hidden_layers=max(2, round(hidden / ASPECT)), num_attention_heads=heads,
                num_key_value_heads=heads // 2 if heads % 2 == 0 else heads, head_dim=head_dim_for(hidden),
                intermediate_size=3 * hidden, moe_intermediate_size=hidden * 2 // BASE_G, num_experts=BASE_EXPERTS,
                num_experts_per_tok=BASE_TOP_K, num_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1,
                num_nextn_predict_layers=0)


def dense_shape(shape: dict) -> dict:
    """The rung as a dense model whose FFN has the MoE layers' active width, (k + shared) * d_expert: A = 1."""
    width = (shape["num_experts_per_tok"] + shape["num_shared_experts"]) * shape["moe_intermediate_size"]
    return {**shape, "intermediate_size": width, "first_k_dense_replace": shape["num_hidden_layers"]}


def granular_shape(shape: dict, g: int) -> dict:
    """The rung at granularity G = 2 d / d_expert, with E and k scaled by G / BASE_G (more, narrower experts)."""
    if (2 * shape["hidden_size"]) % g or (BASE_EXPERTS * g) % BASE_G or (BASE_TOP_K * g) % BASE_G:
        raise SweepError(f"scaling grid: granularity {g} does not divide the expert width 2 x {shape['hidden_size']} "
                         f"or scale {BASE_EXPERTS} experts / top-{BASE_TOP_K} to whole numbers")
    return {**shape, "moe_intermediate_size": 2 * shape["hidden_size"] // g,
            "num_experts": BASE_EXPERTS * g // BASE_G, "num_experts_per_tok": BASE_TOP_K * g // BASE_G}


def model_config(shape: dict):
    """The validated ModelConfig of a shape (the base preset with its fields), or a one-line error."""
    return load_config(BASE_PRESET, overrides=[f"--model.{k}={v}" for k, v in shape.items()]).model


@functools.cache
def _shape_flops(items: tuple, seq_len: int) -> float:
    return non_embedding_flops_per_token(model_config(dict(items)), seq_len)


def shape_flops(shape: dict, seq_len: int) -> float:
    """M of SPEC §4 for a shape (cached: plans and the suggest search ask for the same shapes many times)."""
    return _shape_flops(tuple(sorted(shape.items())), seq_len)


def nearest_rung(target_m: float, widths, seq_len: int) -> int:
    """Index of the width whose rung's M is nearest target_m in log space."""
    return int(np.argmin([abs(math.log(shape_flops(rung_shape(w), seq_len) / target_m)) for w in widths]))


# ---------------------------------------------------------------- the plan and its cost


@dataclass(frozen=True)
class PlannedRun:
    """One training run of the sweep: its budget, model fields and training settings."""

    name: str
    axis: str
    budget: float
    shape: dict
    lr: float
    batch_size: int  # sequences
    steps: int
    grid: SweepGrid
    lr_multiplier: float = 1.0
    batch_multiplier: float = 1.0

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.grid.seq_len

    @property
    def m(self) -> float:
        """M of SPEC §4: non-embedding training FLOPs per token."""
        return shape_flops(self.shape, self.grid.seq_len)

    @property
    def compute(self) -> float:
        return self.m * self.tokens

    def config(self) -> Config:
        g = self.grid
        train = dict(max_steps=self.steps, batch_size=self.batch_size, lr=self.lr, schedule="wsd", decay_frac=g.decay_frac,
                     warmup_steps=max(1, round(g.warmup_frac * self.steps)), seed=g.seed, eval_every=0, num_samples=0,
                     ckpt_every=self.steps, keep_last=1, log_every=self.steps, load_every=self.steps,
                     eval_problems=g.eval_problems)
        data = dict(seq_len=g.seq_len, num_documents=g.num_documents, seed=g.seed, vocab_size=g.vocab_size)
        if g.corpus:
            data |= dict(corpus=g.corpus, heldout_tokens=g.heldout_tokens)
        model = {**self.shape, "vocab_size": g.vocab_size}  # the tokenizer's: trained with data.vocab_size
        overrides = [f"--{section}.{k}={v}" for section, values in (("model", model), ("train", train), ("data", data))
                     for k, v in values.items()]
        return load_config(BASE_PRESET, overrides=overrides)

    def estimated_seconds(self) -> float:
        full = flops_per_token(model_config({**self.shape, "vocab_size": self.grid.vocab_size}), self.grid.seq_len,
                               include_mtp=False)  # with the lm_head
        return self.tokens * full / CPU_FLOPS + self.steps * STEP_OVERHEAD_S + RUN_OVERHEAD_S


def _short(c: float) -> str:
    """3e+11 -> 3e11, 1.6e+12 -> 1.6e12: budgets in run names."""
    return f"{c:.3g}".replace("e+", "e")


def lr_for(grid: SweepGrid, budget: float) -> float:
    """The grid's peak LR at compute `budget` (multiplier 1)."""
    return _rule_at(grid.lr, OPTIMAL_LR, budget)


def batch_for(grid: SweepGrid, budget: float, multiplier: float = 1.0) -> int:
    """The grid's batch at compute `budget`, in whole sequences of grid.seq_len."""
    return max(1, round(_rule_at(grid.batch_tokens, OPTIMAL_BATCH_TOKENS, budget) * multiplier / grid.seq_len))


def shape_window(grid: SweepGrid, budget: float) -> list[int]:
    """Ladder widths of the budget's IsoFLOP profile: sizes_per_budget rungs around the one nearest
    centre_scale x the published MoE M_opt(C), shifted to stay inside the ladder."""
    widths = sorted(grid.ladder)
    m_opt, _ = compute_optimal(budget, "moe")
    centre = nearest_rung(grid.centre_scale * float(m_opt), widths, grid.seq_len)
    start = min(max(0, centre - (grid.sizes_per_budget - 1) // 2), len(widths) - grid.sizes_per_budget)
    return widths[start:start + grid.sizes_per_budget]


def _variants(grid: SweepGrid, axis: str, budget: float):
    """(tag, shape, lr multiplier, batch multiplier) of every run of one axis at one budget."""
    window = shape_window(grid, budget)
    if axis == "shape":
        varied = not grid.hyper_budgets or budget in grid.hyper_budgets
        for w in window:
            for lm in grid.lr_multipliers if varied else [1.0]:
                for bm in grid.batch_multipliers if varied else [1.0]:
                    tag = f"d{w}" + (f"-lrx{lm:g}" if lm != 1 else "") + (f"-bx{bm:g}" if bm != 1 else "")
                    yield tag, rung_shape(w), lm, bm
        return
    base = rung_shape(window[len(window) // 2])  # the profile's middle rung
    prefix = f"d{base['hidden_size']}"
    if axis == "activation":
        for e in grid.num_experts:
            yield f"{prefix}-E{e}", {**base, "num_experts": e}, 1.0, 1.0
        yield f"{prefix}-dense", dense_shape(base), 1.0, 1.0
    else:
        for g in grid.granularities:
            yield f"{prefix}-G{g}", granular_shape(base, g), 1.0, 1.0


def plan_runs(grid: SweepGrid) -> tuple[list[PlannedRun], list[str]]:
    """Every run of the grid's axes, and a note for each run dropped because it would be shorter than min_steps."""
    runs, notes = [], []
    for axis in grid.axes:
        for budget in grid.budgets if axis == "shape" else grid.axis_budgets:
            for tag, shape, lm, bm in _variants(grid, axis, budget):
                name = f"{axis}-C{_short(budget)}-{tag}"
                batch = batch_for(grid, budget, bm)
                steps = round(budget / (shape_flops(shape, grid.seq_len) * batch * grid.seq_len))
                if steps < grid.min_steps:
                    notes.append(f"dropped {name}: {steps} steps < min_steps {grid.min_steps}")
                    continue
                runs.append(PlannedRun(name, axis, float(budget), shape, lr_for(grid, budget) * lm, batch, steps, grid, lm, bm))
    return runs, notes


def minutes(seconds: float) -> str:
    """Seconds as the plan and the sweep's ETA print them: 26.8 min."""
    return f"{seconds / 60:.1f} min"


def active_params(shape: dict) -> tuple[int, int]:
    """(N = active non-embedding parameters, total parameters), counted on the meta device."""
    from linglab.model import build_model, count_parameters

    counts = count_parameters(build_model(model_config(shape), device="meta"))
    return counts.active_non_embedding, counts.total


def describe_plan(runs: list[PlannedRun], notes: list[str], grid: SweepGrid) -> list[str]:
    """The --dry-run table: one line per run, then the totals."""
    lines = [f"{'run':34s} {'d x L':>7s} {'E/k':>6s} {'A':>5s} {'N':>6s} {'M':>6s} {'batch':>5s} {'steps':>6s} "
             f"{'D':>6s} {'C':>7s} {'C/budget':>8s} {'lr':>7s} {'est':>7s}"]
    for r in runs:
        s = r.shape
        kind = "dense" if s["first_k_dense_replace"] >= s["num_hidden_layers"] else f"{s['num_experts']}/{s['num_experts_per_tok']}"
        a = activation_ratio(model_config(s))
        lines.append(f"{r.name:34s} {s['hidden_size']:>3d} x {s['num_hidden_layers']:<2d} {kind:>6s} {a:5.2f} "
                     f"{si(active_params(s)[0]):>6s} {si(r.m):>6s} {r.batch_size:>5d} {r.steps:>6d} "
                     f"{si(r.tokens):>6s} {r.compute:7.2e} {r.compute / r.budget:8.4f} {r.lr:7.1e} "
                     f"{minutes(r.estimated_seconds()):>7s}")
    build_s, corpus = corpus_estimate(grid)
    total = sum(r.estimated_seconds() for r in runs) + build_s
    largest = max((r.tokens for r in runs), default=0)
    lines += notes
    lines.append(f"{len(runs)} runs, {sum(r.compute for r in runs):.2e} FLOPs, estimated {minutes(total)} on this CPU "
                 f"(assumed {CPU_FLOPS / 1e9:.0f} GFLOP/s, {STEP_OVERHEAD_S * 1e3:.0f} ms/step, {RUN_OVERHEAD_S:.0f} s/run, "
                 f"{build_s:.0f} s for the corpus); largest run reads ~{largest / corpus:.2g} epochs of the "
                 f"{grid.corpus or 'embedded'} corpus (~{si(corpus)} training tokens)")
    return lines


def corpus_estimate(grid: SweepGrid) -> tuple[float, float]:
    """(seconds to build, training tokens) of the grid's corpus, estimated without tokenizing it."""
    if not grid.corpus:
        return grid.num_documents * CORPUS_S_PER_DOC, grid.num_documents * CORPUS_TOKENS_PER_DOC
    from linglab.corpora import load_corpus

    info = load_corpus(grid.corpus).info
    return NAMED_CORPUS_S, info["bytes"] * (1 - info["heldout_percent"] / 100) / BYTES_PER_TOKEN

