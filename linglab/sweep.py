"""The scaling-law sweep (SPEC §4): a resumable grid of training runs over compute budgets, the fits of its
results, and training configs suggested from the fitted (or the published) laws.

    linglab scaling sweep --out runs/scaling --dry-run      # the planned runs and their estimated time
    linglab scaling sweep --out runs/scaling                # the default grid, ~30 min on 2 CPU cores; rerun to resume
    linglab scaling fit --dir runs/scaling                  # fit.json, scaling.md and plots/*.png
    linglab scaling suggest --compute 1e14 --fit runs/scaling/fit.json --out big.toml

A run is one compute budget C and one model: it trains D = C / M tokens (M = non-embedding training FLOPs per
token, active experts only; SPEC §4), rounded to whole optimizer steps, on the embedded arithmetic corpus, then
records its held-out and final training loss as one line of results.jsonl. Axes, one at a time:

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
import json
import math
import shutil
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from linglab import scaling
from linglab.config import Config, load_config, to_toml
from linglab.errors import LinglabError
from linglab.flops import flops_per_token

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


class SweepError(LinglabError):
    """A bad grid, axis, budget or results file."""


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
    lr: float | str = 3e-3  # a fixed peak LR (why: the module docstring), or "published" = eta_opt(C) of SPEC §4
    batch_tokens: float | str = "published"  # "published" = B_opt(C) of SPEC §4, else fixed; rounded to sequences
    lr_multipliers: list[float] = field(default_factory=lambda: [1.0])  # shape axis: >1 value to fit eta_opt(C)
    batch_multipliers: list[float] = field(default_factory=lambda: [1.0])  # shape axis: >1 value to fit B_opt(C)
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
        special = {"lr": (lambda v: v == "published" or _fits(v, 1.0), "'published' or a positive number"),
                   "batch_tokens": (lambda v: v == "published" or _fits(v, 1.0), "'published' or a positive number"),
                   "warmup_frac": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
                   "decay_frac": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
                   "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0")}
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
        if self.sizes_per_budget > len(self.ladder):
            raise SweepError(f"scaling grid: sizes_per_budget ({self.sizes_per_budget}) exceeds the ladder's {len(self.ladder)} rungs")


def _fits(value, default) -> bool:
    """value has default's type (an int passes for a float) and, if a number, is finite and positive."""
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool) and value > 0
    return _is_number(value) and math.isfinite(value) and value > 0


def _kind(default) -> str:
    return "string" if isinstance(default, str) else "positive integer" if isinstance(default, int) else "positive number"


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def check_axis(axis: str) -> str:
    if axis not in AXES:
        raise SweepError(f"scaling: unknown axis {axis!r} (choose from: {', '.join(AXES)})")
    return axis


def load_grid(path: str | Path | None = None, budgets: list[float] | None = None, axes: list[str] | None = None) -> SweepGrid:
    """The default grid, then a TOML file's top-level keys, then --budgets / --axis; validated."""
    grid = SweepGrid()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SweepError(f"scaling: grid file not found: {path}")
        try:
            tree = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise SweepError(f"scaling: {path} is not valid TOML ({e})") from None
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
    return scaling.non_embedding_flops_per_token(model_config(dict(items)), seq_len)


def shape_flops(shape: dict, seq_len: int) -> float:
    """M of SPEC §4 for a shape (cached: plans and the suggest search ask for the same shapes many times)."""
    return _shape_flops(tuple(sorted(shape.items())), seq_len)


def nearest_rung(target_m: float, widths, seq_len: int) -> int:
    """Index of the width whose rung's M is nearest target_m in log space."""
    return int(np.argmin([abs(math.log(shape_flops(rung_shape(w), seq_len) / target_m)) for w in widths]))


# ---------------------------------------------------------------- the plan


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
        data = dict(seq_len=g.seq_len, num_documents=g.num_documents, seed=g.seed)
        overrides = [f"--{section}.{k}={v}" for section, values in (("model", self.shape), ("train", train), ("data", data))
                     for k, v in values.items()]
        return load_config(BASE_PRESET, overrides=overrides)

    def estimated_seconds(self) -> float:
        full = flops_per_token(model_config(self.shape), self.grid.seq_len, include_mtp=False)  # with the lm_head
        return self.tokens * full / CPU_FLOPS + self.steps * STEP_OVERHEAD_S + RUN_OVERHEAD_S


def _short(c: float) -> str:
    """3e+11 -> 3e11, 1.6e+12 -> 1.6e12: budgets in run names."""
    return f"{c:.3g}".replace("e+", "e")


def _lr_for(grid: SweepGrid, budget: float) -> float:
    return float(scaling.optimal_lr(budget)) if grid.lr == "published" else float(grid.lr)


def _batch_for(grid: SweepGrid, budget: float, multiplier: float) -> int:
    tokens = float(scaling.optimal_batch_tokens(budget)) if grid.batch_tokens == "published" else float(grid.batch_tokens)
    return max(1, round(tokens * multiplier / grid.seq_len))


def shape_window(grid: SweepGrid, budget: float) -> list[int]:
    """Ladder widths of the budget's IsoFLOP profile: sizes_per_budget rungs around the one nearest
    centre_scale x the published MoE M_opt(C), shifted to stay inside the ladder."""
    widths = sorted(grid.ladder)
    m_opt, _ = scaling.compute_optimal(budget, "moe")
    centre = nearest_rung(grid.centre_scale * float(m_opt), widths, grid.seq_len)
    start = min(max(0, centre - (grid.sizes_per_budget - 1) // 2), len(widths) - grid.sizes_per_budget)
    return widths[start:start + grid.sizes_per_budget]


def _variants(grid: SweepGrid, axis: str, budget: float):
    """(tag, shape, lr multiplier, batch multiplier) of every run of one axis at one budget."""
    window = shape_window(grid, budget)
    if axis == "shape":
        for w in window:
            for lm in grid.lr_multipliers:
                for bm in grid.batch_multipliers:
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
                batch = _batch_for(grid, budget, bm)
                steps = round(budget / (shape_flops(shape, grid.seq_len) * batch * grid.seq_len))
                if steps < grid.min_steps:
                    notes.append(f"dropped {name}: {steps} steps < min_steps {grid.min_steps}")
                    continue
                runs.append(PlannedRun(name, axis, float(budget), shape, _lr_for(grid, budget) * lm, batch, steps, grid, lm, bm))
    return runs, notes


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _active_params(shape: dict) -> tuple[int, int]:
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
        a = scaling.activation_ratio(model_config(s))
        lines.append(f"{r.name:34s} {s['hidden_size']:>3d} x {s['num_hidden_layers']:<2d} {kind:>6s} {a:5.2f} "
                     f"{_si(_active_params(s)[0]):>6s} {_si(r.m):>6s} {r.batch_size:>5d} {r.steps:>6d} "
                     f"{_si(r.tokens):>6s} {r.compute:7.2e} {r.compute / r.budget:8.4f} {r.lr:7.1e} "
                     f"{_minutes(r.estimated_seconds()):>7s}")
    total = sum(r.estimated_seconds() for r in runs) + grid.num_documents * CORPUS_S_PER_DOC
    largest = max((r.tokens for r in runs), default=0)
    corpus = grid.num_documents * CORPUS_TOKENS_PER_DOC
    lines += notes
    lines.append(f"{len(runs)} runs, {sum(r.compute for r in runs):.2e} FLOPs, estimated {_minutes(total)} on this CPU "
                 f"(assumed {CPU_FLOPS / 1e9:.0f} GFLOP/s, {STEP_OVERHEAD_S * 1e3:.0f} ms/step, {RUN_OVERHEAD_S:.0f} s/run, "
                 f"{grid.num_documents * CORPUS_S_PER_DOC:.0f} s for the corpus); "
                 f"largest run reads ~{largest / corpus:.1f} epochs of the corpus")
    return lines


# ---------------------------------------------------------------- running


def _finished(path: Path) -> dict[str, dict]:
    """name -> row of a results.jsonl (the last line of a name wins); a torn line, from a kill mid-write, is skipped."""
    rows = {}
    for line in path.read_text().splitlines() if path.is_file() else ():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "name" in row:
            rows[row["name"]] = row
    return rows


def read_results(path: str | Path) -> list[dict]:
    """The finished runs of a results.jsonl, or a one-line error when there are none."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"scaling: results file not found: {path} (run `linglab scaling sweep` first)")
    rows = _finished(path)
    if not rows:
        raise SweepError(f"scaling: {path} holds no finished runs")
    return list(rows.values())


def train_run(run: PlannedRun, data, run_dir: Path, log=print) -> dict:
    """Train one planned run with `Trainer.fit` (no evals, one checkpoint at the end), measure its losses, return its row.

    A run dir that already holds the final checkpoint (killed between training and the results line) is resumed
    from it and only evaluated; anything less is discarded and trained from the start: runs are minutes long.
    Checkpoints are deleted once measured; config.toml and metrics.jsonl stay.
    """

    from linglab import evals, report
    from linglab.model import build_model
    from linglab.run import RunDir, seed_everything
    from linglab.train import STATE_NAME, build_trainer

    start = time.perf_counter()
    cfg = run.config()
    rd = RunDir(run_dir, "scaling sweep", STATE_NAME)
    resume = any(d.name == f"step_{run.steps:06d}" for d in rd.checkpoints()) \
        and (run_dir / "config.toml").is_file() and (run_dir / "config.toml").read_text() == to_toml(cfg)
    rd.prepare(resume=resume, overwrite=not resume)
    rd.write_config(cfg)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, seed=cfg.train.seed)
    trainer = build_trainer(cfg, rd, data, model, log=log)
    if resume:
        trainer.resume()
    trainer.fit()
    heldout = evals.heldout_loss(model, data.heldout)
    train_rows, _ = report.read_metrics(run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in train_rows if not r.get("skipped")][-report.FINAL_LOSS_WINDOW:]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    n, n_total = _active_params(run.shape)
    return {"name": run.name, "axis": run.axis, "budget": run.budget, "compute": run.compute,
            "model": {k: run.shape[k] for k in SHAPE_KEYS}, "kind": scaling.model_kind(cfg.model),
            "activation_ratio": scaling.activation_ratio(cfg.model), "granularity": scaling.granularity(cfg.model),
            "N": n, "N_total": n_total, "M": run.m, "D": run.tokens, "steps": run.steps,
            "lr": run.lr, "lr_multiplier": run.lr_multiplier, "batch_size": run.batch_size,
            "batch_tokens": run.batch_size * cfg.data.seq_len, "batch_multiplier": run.batch_multiplier,
            "seq_len": cfg.data.seq_len, "train_loss": float(np.mean(losses)) if losses else None,
            "heldout_loss": heldout, "train_time_s": trainer.counters["elapsed"], "wall_time_s": time.perf_counter() - start}


def run_sweep(grid: SweepGrid, out: str | Path, log=print, command: str = "") -> list[dict]:
    """Train every planned run not yet in out/results.jsonl, appending one line per finished run; returns the new rows."""
    from linglab.data import build_data

    out = Path(out)
    runs, notes = plan_runs(grid)
    results = out / "results.jsonl"
    done = _finished(results)
    todo = [r for r in runs if r.name not in done]
    for note in notes:
        log(note)
    estimate = sum(r.estimated_seconds() for r in todo)
    log(f"{len(runs)} runs planned, {len(runs) - len(todo)} already in {results}, {len(todo)} to train "
        f"(estimated {_minutes(estimate)})")
    if not todo:
        return []
    out.mkdir(parents=True, exist_ok=True)
    record = out / "sweep.json"  # the grid and every command that trained into out/, for scaling.md
    commands = json.loads(record.read_text()).get("commands", []) if record.is_file() else []
    record.write_text(json.dumps({"grid": dataclasses.asdict(grid), "commands": [*commands, command]}, indent=2) + "\n")
    data_cfg = todo[0].config()
    # Built once for every run (same corpus, tokenizer and held-out set); the tokenizer is saved in out/ and reused.
    data = build_data(data_cfg.data, out, data_cfg.train.eval_problems)
    new, spent, estimated = [], 0.0, 0.0
    for i, run in enumerate(todo):
        row = train_run(run, data, out / "runs" / run.name, log=log)
        torn = results.is_file() and results.stat().st_size > 0 and not results.read_bytes().endswith(b"\n")
        with open(results, "a") as f:
            f.write(("\n" if torn else "") + json.dumps(row) + "\n")  # a line torn by a kill stays apart from this one
        new.append(row)
        spent += row["wall_time_s"]
        estimated += run.estimated_seconds()
        remaining = sum(r.estimated_seconds() for r in todo[i + 1:]) * spent / estimated
        log(f"[{i + 1}/{len(todo)}] {run.name}: N {_si(row['N'])} D {_si(row['D'])} held-out {row['heldout_loss']:.4f} "
            f"train {row['train_loss']:.4f} in {row['wall_time_s']:.0f} s; ETA {_minutes(remaining)}")
    return new


# ---------------------------------------------------------------- fits


def _loss(row: dict) -> float:
    return row["heldout_loss"]


def frontier(rows: list[dict]) -> list[dict]:
    """The best (lowest held-out loss) run at each budget, by budget."""
    best: dict[float, dict] = {}
    for row in rows:
        if row["budget"] not in best or _loss(row) < _loss(best[row["budget"]]):
            best[row["budget"]] = row
    return [best[c] for c in sorted(best)]


def _invert(curve: dict, loss: float) -> float:
    """The compute at which a fitted loss curve reaches `loss`: inf when it is at or below the curve's floor."""
    if "alpha" in curve:  # saturating L = E + A C^-alpha
        return math.inf if loss <= curve["E"] else ((loss - curve["E"]) / curve["A"]) ** (-1 / curve["alpha"])
    return (loss / curve["coef"]) ** (1 / curve["exponent"])


def _on_rule(rows: list[dict]) -> list[dict]:
    """The runs at the sweep's own LR and batch rule (multipliers 1)."""
    return [r for r in rows if r["lr_multiplier"] == 1 and r["batch_multiplier"] == 1]


def _hyper_optimum(rows: list[dict], key: str, other: str) -> list[tuple[float, float]]:
    """(budget, value of `key` of the best run) at budgets where runs of the best shape and `other` vary `key`."""
    points = []
    for best in frontier(rows):
        peers = [r for r in rows if r["budget"] == best["budget"] and r["model"] == best["model"] and r[other] == best[other]]
        if len({r[key] for r in peers}) > 1:
            points.append((best["budget"], best[key]))
    return points


def fit_results(rows: list[dict], n_boot: int = 200) -> dict:
    """Every fit of SPEC §4 the results support; a note for each one they do not.

    Losses are held-out losses. Shape-axis runs give the frontier L(C) (best loss per budget, fit_loss_vs_compute),
    the wind-tunnel check (the largest budget predicted from the others), M_opt(C) (M of the best run per budget),
    L(N, D) with bootstrap intervals (>= 5 distinct (N, D)), and eta_opt / B_opt when the grid varied them. Dense runs
    give L_dense(C); each MoE run of the other axes then has EL = C_dense(L_MoE) / C_MoE beside the published EL.
    """
    notes, fit = [], {"runs": len(rows), "laws": {}}
    shape_rows = [r for r in rows if r["axis"] == "shape"]
    front = frontier(shape_rows)
    fit["frontier"] = [{"budget": r["budget"], "name": r["name"], "loss": _loss(r), "M": r["M"], "N": r["N"], "D": r["D"]}
                       for r in front]
    if len(front) >= 3:
        curve = scaling.fit_loss_vs_compute([r["compute"] for r in front], [_loss(r) for r in front])
        fit["laws"]["loss_vs_compute"] = curve.as_dict()
        fit["laws"]["m_opt"] = scaling.fit_power_law([r["budget"] for r in front], [r["M"] for r in front]).as_dict()
        if n_boot:  # 90% bootstrap intervals over the frontier points
            fit["intervals"] = {
                "loss_vs_compute": scaling.bootstrap_loss_vs_compute([r["compute"] for r in front],
                                                                     [_loss(r) for r in front], n_boot=n_boot, fit=curve),
                "m_opt": scaling.bootstrap_power_law([r["budget"] for r in front], [r["M"] for r in front])}
        edges = [f"{r['budget']:.3g}" for r in front
                 if len(ms := {p["M"] for p in shape_rows if p["budget"] == r["budget"]}) > 1 and r["M"] in (min(ms), max(ms))]
        if edges:
            notes.append(f"M_opt: at C = {', '.join(edges)} the best run is the smallest or largest of its profile, so the "
                         "optimum may lie outside it there (widen sizes_per_budget or move centre_scale)")
    else:
        notes.append(f"loss vs compute: {len(front)} shape-axis budgets, need >= 3")
    if len(front) >= 4:
        fit["holdout"] = scaling.holdout_prediction([r["compute"] for r in front], [_loss(r) for r in front]).as_dict()
    else:
        notes.append(f"held-out prediction: {len(front)} shape-axis budgets, need >= 4")

    # L(N, D) from the runs at the sweep's own LR and batch: an off-optimum LR would read as a worse (N, D).
    on_rule = _on_rule(shape_rows)
    pairs = {(r["N"], r["D"]) for r in on_rule}
    if len(pairs) >= 5:
        n, d, loss = ([r[k] for r in on_rule] for k in ("N", "D", "heldout_loss"))
        chin = scaling.fit_chinchilla(n, d, loss)
        # Undertrained small runs can prefer a smaller N at every D: alpha <= 0 (or a term at 0) has no optimum.
        sane = all(math.isfinite(v) and v > 0 for v in chin.as_dict().values())
        fit["chinchilla"] = {"fit": chin.as_dict(), "n_opt_exponent": chin.n_opt_exponent, "degenerate": not sane,
                             "d_opt_exponent": chin.d_opt_exponent, "points": len(pairs),
                             "intervals": scaling.bootstrap_chinchilla(n, d, loss, n_boot=n_boot, fit=chin)
                             if n_boot and sane else None}
        if not sane:
            notes.append(f"L(N, D): the fit is degenerate ({', '.join(f'{k} = {v:.3g}' for k, v in chin.as_dict().items())}): "
                         "no intervals and no compute-optimal N, D")
    else:
        notes.append(f"L(N, D): {len(pairs)} distinct (N, D) shape-axis pairs, need >= 5")

    for key, other, law in (("lr", "batch_tokens", "lr"), ("batch_tokens", "lr", "batch_tokens")):
        points = _hyper_optimum(shape_rows, key, other)
        if len(points) >= 2:
            fit["laws"][law] = scaling.fit_power_law(*zip(*points)).as_dict()
            fit[f"{law}_optima"] = points
        else:
            notes.append(f"optimal {key} vs compute: the sweep did not vary {key} at >= 2 budgets")
    # The rules the sweep itself used, for `suggest` where no optimum was fitted (exact for fixed and published rules).
    plain = _on_rule(rows) or rows
    fit["sweep_rules"] = {key: scaling.fit_power_law([r["budget"] for r in plain], [r[key] for r in plain]).as_dict()
                          for key in ("lr", "batch_tokens")}

    dense = frontier([r for r in rows if r["kind"] == "dense"])
    moe_axis = [r for r in rows if r["axis"] != "shape" and r["kind"] == "moe"]
    c_dense, l_dense = [r["compute"] for r in dense], [_loss(r) for r in dense]
    curve = None
    if len(dense) >= 2 and moe_axis:
        curve = (scaling.fit_loss_vs_compute(c_dense, l_dense).as_dict() if len(dense) >= 3
                 else scaling.fit_power_law(c_dense, l_dense).as_dict())
    if curve is not None and curve.get("exponent", -1) < 0 and curve.get("alpha", 1) > 0:
        fit["dense_curve"] = curve
        fit["leverage"] = []
        for r in sorted(moe_axis, key=lambda r: (r["axis"], r["budget"], r["activation_ratio"], r["granularity"])):
            c_eq = _invert(curve, _loss(r))
            fit["leverage"].append({
                "name": r["name"], "axis": r["axis"], "budget": r["budget"], "A": r["activation_ratio"], "G": r["granularity"],
                "loss": _loss(r), "C_dense": c_eq, "EL": c_eq / r["compute"],
                "extrapolated": not (min(c_dense) <= c_eq <= max(c_dense)),
                "EL_published": float(scaling.efficiency_leverage(r["activation_ratio"], r["granularity"], r["compute"]))})
    elif curve is not None:
        notes.append(f"efficiency leverage: the dense loss does not fall with compute ({l_dense} at C = {c_dense}); "
                     "no curve to invert")
    else:
        notes.append(f"efficiency leverage: needs dense runs at >= 2 budgets and MoE runs of the activation or "
                     f"granularity axis (have {len(dense)} dense budgets, {len(moe_axis)} MoE runs)")
    fit["notes"] = notes
    return fit


def _log_axes(ax, y_counts: bool = False) -> None:
    """Log x and y with plain labels at 1-2-5 (1e10, 2e10; 0.5, 1, 2): matplotlib's 3x10^9 minor labels collide.
    x is a count (FLOPs, parameters), written 2e10; y too when y_counts, else a loss or ratio, written 0.5."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def count(v, _):
        return f"{v:.0e}".replace("e+0", "e").replace("e+", "e")

    ax.set(xscale="log", yscale="log")
    for axis, label in ((ax.xaxis, count), (ax.yaxis, count if y_counts else lambda v, _: f"{v:g}")):
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(label))
        axis.set_minor_formatter(NullFormatter())


def _plot_loss_vs_compute(rows, fit, path: Path) -> bool:
    import matplotlib.pyplot as plt

    from linglab.report import DPI, FIGSIZE

    shape_rows = [r for r in rows if r["axis"] == "shape"]
    if "loss_vs_compute" not in fit["laws"]:
        return False
    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    ax.scatter([r["compute"] for r in shape_rows], [_loss(r) for r in shape_rows], s=12, color="0.6", label="runs")
    ax.scatter([r["budget"] for r in fit["frontier"]], [r["loss"] for r in fit["frontier"]], s=22, color="tab:blue",
               label="best per budget", zorder=3)
    budgets = [r["budget"] for r in fit["frontier"]]
    c = np.geomspace(min(budgets) / 1.5, max(budgets) * 1.5, 100)
    law = scaling.LossCurve(**fit["laws"]["loss_vs_compute"])
    ax.plot(c, law.predict(c), color="tab:blue", label=f"fit: {law.E:.3g} + {law.A:.3g} C^-{law.alpha:.3g}")
    if "holdout" in fit:
        h = fit["holdout"]
        ax.plot(c, scaling.LossCurve(**h["fit"]).predict(c), "--", color="tab:orange", label="fit without the largest")
        ax.scatter([h["compute"]], [h["predicted"]], marker="o", facecolors="none", edgecolors="tab:orange", s=60,
                   label=f"predicted (error {h['abs_error']:.3g})", zorder=4)
        ax.scatter([h["compute"]], [h["actual"]], marker="*", color="tab:red", s=90, label="held-out budget", zorder=4)
    _log_axes(ax)
    ax.set(xlabel="compute C = M D (FLOPs)", ylabel="held-out loss", title="loss vs compute")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _plot_leverage(fit, path: Path) -> bool:
    import matplotlib.pyplot as plt

    from linglab.report import DPI, FIGSIZE

    rows = [r for r in fit.get("leverage", []) if r["axis"] == "activation" and math.isfinite(r["EL"])]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    a = np.geomspace(min(r["A"] for r in rows) / 1.5, 1.0, 50)
    for i, budget in enumerate(sorted({r["budget"] for r in rows})):
        these = sorted((r for r in rows if r["budget"] == budget), key=lambda r: r["A"])
        color = f"C{i}"
        ax.plot([r["A"] for r in these], [r["EL"] for r in these], "o-", color=color, label=f"measured, C = {budget:.2g}")
        g = these[0]["G"]
        ax.plot(a, scaling.efficiency_leverage(a, g, budget), "--", color=color, label=f"published law, G = {g:g}")
    ax.axhline(1.0, color="0.5", lw=0.8)
    _log_axes(ax)
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")  # A is a ratio, not a FLOP count
    ax.set(xlabel="activation ratio A", ylabel="EL = C_dense / C_MoE",
           title="efficiency leverage vs activation ratio")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _plot_chinchilla(rows, fit, path: Path) -> bool:
    import matplotlib.pyplot as plt

    from linglab.report import DPI, FIGSIZE

    if "chinchilla" not in fit:
        return False
    law = scaling.ChinchillaFit(**fit["chinchilla"]["fit"])
    on_rule = _on_rule([r for r in rows if r["axis"] == "shape"])
    n, d, loss = (np.array([r[k] for r in on_rule], dtype=float) for k in ("N", "D", "heldout_loss"))
    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    gn, gd = np.meshgrid(np.geomspace(n.min() / 2, n.max() * 2, 80), np.geomspace(d.min() / 2, d.max() * 2, 80))
    levels = np.geomspace(loss.min() * 0.8, loss.max() * 1.25, 12)
    contours = ax.contour(gn, gd, law.predict(gn, gd), levels=levels, cmap="viridis", norm="log", linewidths=0.8)
    ax.clabel(contours, fontsize=6, fmt="%.3g")
    ax.scatter(n, d, c=loss, cmap="viridis", norm="log", vmin=levels[0], vmax=levels[-1], edgecolors="k", s=30, zorder=3)
    if not fit["chinchilla"]["degenerate"]:
        n_opt, d_opt = scaling.chinchilla_optimal(np.geomspace((6 * n * d).min(), (6 * n * d).max(), 20), law)
        ax.plot(n_opt, d_opt, "--", color="tab:red", label="compute-optimal (C = 6ND)")
        ax.legend(fontsize=7)
    _log_axes(ax, y_counts=True)
    ax.set(xlim=(gn.min(), gn.max()), ylim=(gd.min(), gd.max()),
           xlabel="N (active non-embedding parameters)", ylabel="D (tokens)", title="L(N, D) fit: contours; runs: dots")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


def _interval(fit: dict, key: str) -> str:
    intervals = fit["chinchilla"]["intervals"]
    return f"[{intervals[key][0]:.4g}, {intervals[key][1]:.4g}]" if intervals else "-"


def write_fit(rows: list[dict], out: str | Path, n_boot: int = 200, commands: list[str] = ()) -> dict:
    """Fit (fit_results), then write out/fit.json, out/plots/*.png and out/scaling.md; returns the fit."""
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    fit = fit_results(rows, n_boot=n_boot)
    fit["commands"] = list(commands)
    (out / "fit.json").write_text(json.dumps(fit, indent=2) + "\n")
    plots = [(name, caption) for name, caption, drawn in (
        ("loss_vs_compute.png", "best held-out loss per budget, the fitted L(C), and the largest budget predicted from the rest",
         _plot_loss_vs_compute(rows, fit, out / "plots" / "loss_vs_compute.png")),
        ("leverage.png", "efficiency leverage vs activation ratio, measured and the published law",
         _plot_leverage(fit, out / "plots" / "leverage.png")),
        ("chinchilla.png", "L(N, D) fitted on the shape-axis runs",
         _plot_chinchilla(rows, fit, out / "plots" / "chinchilla.png"))) if drawn]

    md = ["# Scaling-law sweep (SPEC §4)", ""]
    if fit["commands"]:
        md += ["Commands:", "", "```", *fit["commands"], "```", ""]
    md += [f"{len(rows)} finished runs; losses are held-out losses on answer tokens of the embedded arithmetic tasks.", ""]
    laws, rules = fit["laws"], fit["sweep_rules"]
    md += ["## Fits", "", f"- the sweep's rules: lr = {rules['lr']['coef']:.4g} C^{rules['lr']['exponent']:.4f}, "
           f"batch = {rules['batch_tokens']['coef']:.4g} C^{rules['batch_tokens']['exponent']:.4f} tokens"]
    if "loss_vs_compute" in laws:
        lc = laws["loss_vs_compute"]
        md.append(f"- loss vs compute (best per budget): L(C) = {lc['E']:.4g} + {lc['A']:.4g} C^-{lc['alpha']:.4g}")
        m = laws["m_opt"]
        md.append(f"- compute-optimal M (M of the best run per budget): M_opt = {m['coef']:.4g} C^{m['exponent']:.4f} "
                  f"(published MoE law: 0.1915 C^0.5095)")
        if "intervals" in fit:
            iv = fit["intervals"]
            span = lambda lo_hi: f"[{lo_hi[0]:.3g}, {lo_hi[1]:.3g}]"  # noqa: E731
            md.append("  - 90% bootstrap intervals over the frontier points: L(C) E " + span(iv["loss_vs_compute"]["E"])
                      + ", A " + span(iv["loss_vs_compute"]["A"]) + ", alpha " + span(iv["loss_vs_compute"]["alpha"])
                      + "; M_opt coef " + span(iv["m_opt"]["coef"]) + ", exponent " + span(iv["m_opt"]["exponent"]))
    if "holdout" in fit:
        h = fit["holdout"]
        md.append(f"- wind tunnel: the largest budget C = {h['compute']:.3g} predicted from the others: {h['predicted']:.4f} "
                  f"vs {h['actual']:.4f} measured, absolute error {h['abs_error']:.4f} (Ling's target: within 0.01)")
    for law, published in (("lr", "1.1576 C^-0.1529"), ("batch_tokens", "0.0694 C^0.3644")):
        if law in laws:
            md.append(f"- optimal {law}: {laws[law]['coef']:.4g} C^{laws[law]['exponent']:.4f} (published: {published})")
    if "chinchilla" in fit:
        ch = fit["chinchilla"]
        how = "DEGENERATE, see the notes" if ch["degenerate"] else "90% bootstrap intervals"
        md += ["", f"L(N, D) = E + A / N^alpha + B / D^beta over {ch['points']} (N, D) pairs ({how}):", ""]
        md += _table(["coefficient", "value", "interval"],
                     [[k, f"{v:.4g}", _interval(fit, k)] for k, v in ch["fit"].items()]
                     + [[k, f"{ch[k]:.4g}", _interval(fit, k)] for k in ("n_opt_exponent", "d_opt_exponent")])
    if fit.get("leverage"):
        md += ["", "## Efficiency leverage", "", "EL = C_dense / C_MoE at equal loss, C_dense from the fitted dense curve "
               f"({'saturating' if 'alpha' in fit['dense_curve'] else 'pure power law through 2 budgets'}); "
               "* = outside the dense runs' compute (extrapolated).", ""]
        md += _table(["run", "C", "A", "G", "loss", "EL", "EL published"],
                     [[r["name"], f"{r['budget']:.3g}", f"{r['A']:.3f}", f"{r['G']:g}", f"{r['loss']:.4f}",
                       f"{r['EL']:.3g}{'*' if r['extrapolated'] else ''}", f"{r['EL_published']:.3g}"] for r in fit["leverage"]])
    if fit["notes"]:
        md += ["", "Notes (fits skipped or to read with care):", "", *(f"- {n}" for n in fit["notes"])]
    if plots:
        md += ["", "## Plots", ""] + [f"![{caption}](plots/{name})\n\n{caption}\n" for name, caption in plots]
    md += ["", "## Runs", ""]
    md += _table(["run", "C", "d x L", "E/k", "N", "M", "D", "lr", "batch", "train loss", "held-out loss", "wall"],
                 [[r["name"], f"{r['compute']:.3g}", f"{r['model']['hidden_size']} x {r['model']['num_hidden_layers']}",
                   "dense" if r["kind"] == "dense" else f"{r['model']['num_experts']}/{r['model']['num_experts_per_tok']}",
                   _si(r["N"]), _si(r["M"]), _si(r["D"]), f"{r['lr']:.2g}", r["batch_tokens"],
                   f"{r['train_loss']:.4f}" if r["train_loss"] is not None else "-", f"{r['heldout_loss']:.4f}",
                   f"{r['wall_time_s']:.0f} s"] for r in sorted(rows, key=lambda r: (AXES.index(r["axis"]), r["budget"], r["name"]))])
    (out / "scaling.md").write_text("\n".join(md) + "\n")
    return fit


# ---------------------------------------------------------------- suggest


SUGGEST_WIDTHS = [*range(64, 1024, 32), *range(1024, 16385, 128)]  # the ladder's family, 32-wide heads then 128


def read_fit(path: str | Path) -> dict:
    """A fit.json of `write_fit` with an M_opt law, or a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"scaling: fit file not found: {path} (run `linglab scaling fit` first)")
    try:
        fit = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise SweepError(f"scaling: {path} is not valid JSON ({e})") from None
    if not isinstance(fit, dict) or "m_opt" not in fit.get("laws", {}):
        raise SweepError(f"scaling: {path} has no fitted M_opt law (the sweep needs >= 3 shape-axis budgets)")
    return fit


def suggest_config(compute: float, fit: dict | None = None, seq_len: int = 128) -> tuple[Config, dict]:
    """A training config for budget C: M from M_opt(C), D = C / M, lr and batch from their laws (SPEC §4).

    From `fit` (a fit.json): its M_opt law, its fitted eta_opt / B_opt where the sweep varied them, else the rules
    the sweep used. Without: the published MoE M_opt, eta_opt and B_opt. The shape is the rung of the sweep's family
    (width multiple of 32 below 1024, of 128 above; depth width / 40; the base MoE) nearest M_opt in log space.
    """
    if not (math.isfinite(compute) and compute > 0):
        raise SweepError(f"scaling suggest: --compute must be a positive number of FLOPs, got {compute}")
    if fit is None:
        source = {"m_opt": "published MoE M_opt = 0.1915 C^0.5095", "lr": "published eta_opt = 1.1576 C^-0.1529",
                  "batch_tokens": "published B_opt = 0.0694 C^0.3644"}
        m_opt, _ = scaling.compute_optimal(compute, "moe")
        lr, batch_tokens = scaling.optimal_lr(compute), scaling.optimal_batch_tokens(compute)
    else:
        source, values = {}, {}
        for key, label in (("m_opt", "fitted M_opt"), ("lr", "fitted eta_opt"), ("batch_tokens", "fitted B_opt")):
            law = fit["laws"].get(key)
            if law is None:
                law, label = fit["sweep_rules"][key], f"the sweep's {key} rule (not varied, so not fitted)"
            values[key] = scaling.PowerLaw(**law).predict(compute)
            source[key] = f"{label} = {law['coef']:.4g} C^{law['exponent']:.4f}"
        m_opt, lr, batch_tokens = values["m_opt"], values["lr"], values["batch_tokens"]
    shape = rung_shape(SUGGEST_WIDTHS[nearest_rung(float(m_opt), SUGGEST_WIDTHS, seq_len)])
    m = shape_flops(shape, seq_len)
    batch = max(1, round(float(batch_tokens) / seq_len))
    steps = max(1, round(compute / (m * batch * seq_len)))
    train = dict(max_steps=steps, batch_size=batch, lr=float(lr), warmup_steps=max(1, round(0.05 * steps)))
    overrides = [f"--model.{k}={v}" for k, v in shape.items()] + [f"--train.{k}={v}" for k, v in train.items()]
    cfg = load_config(BASE_PRESET, overrides=overrides + [f"--data.seq_len={seq_len}"])
    n, _ = _active_params(shape)
    info = {"compute": compute, "M_opt": float(m_opt), "M": m, "N": n, "D": steps * batch * seq_len,
            "compute_planned": m * steps * batch * seq_len, "source": source, "from_fit": fit is not None}
    return cfg, info


def suggestion_toml(cfg: Config, info: dict) -> str:
    """The config as TOML, headed by comments saying which laws chose it."""
    head = [f"# linglab scaling suggest: C = {info['compute']:.4g} FLOPs ({'fitted laws' if info['from_fit'] else 'published laws'}, "
            "SPEC §4)",
            f"# M = {info['M']:.4g} FLOPs/token (M_opt {info['M_opt']:.4g}), N = {info['N']:,} active non-embedding parameters, "
            f"D = {info['D']:,} tokens, M * D = {info['compute_planned']:.4g}"]
    head += [f"# {key}: {text}" for key, text in info["source"].items()]
    epochs = info["D"] / (cfg.data.num_documents * CORPUS_TOKENS_PER_DOC)
    if not cfg.data.path and epochs > 1:
        head.append(f"# D is ~{epochs:.3g} epochs of the embedded corpus: raise data.num_documents or set data.path")
    return "\n".join(head) + "\n\n" + to_toml(cfg)
