"""Pretraining (SPEC §2): AdamW, linear warmup then WSD or WSM, MTP, aux-loss-free balancing, exact resume.

    linglab train --preset tiny --out runs/tiny            # the main job (`make run`)
    linglab train --out runs/tiny --resume                  # continue bit-exactly from the last checkpoint
    linglab train --preset tiny-linear --init-from ckpt/tiny-hybrid --out runs/hybrid   # a new run from given weights
    torchrun --nproc_per_node 2 -m linglab train --preset tiny --out runs/tiny-dp2   # FSDP2 (+ EP) on 2 ranks

A run directory holds the resolved `config.toml`, `tokenizer.json`, `metrics.jsonl`, TensorBoard events
(when tensorboard is installed), `checkpoints/step_NNNNNN/` (each an HF BailingMoeV2 checkpoint plus
`train_state.pt`), `final/` (the last model as an HF checkpoint with its tokenizer), held-out
evaluations, samples, plots and `report.md`.

Per step: a forward/backward per micro-batch, gradient clipping, a skip if the loss or the gradient is
not finite, the AdamW step, then the expert-bias update from this step's expert loads (SPEC §1.4). With
`train.precision=bf16` each forward runs under bf16 autocast on the fp32 weights (`linglab.precision`);
`train.recompute` re-runs chosen modules' forwards in backward (`linglab.recompute`, applied by `build_trainer`).

`--init-from CKPT` starts a new run (step 0, fresh AdamW, the run's own LR schedule) from a checkpoint's weights
and expert biases, e.g. one `linglab convert` made (SPEC §8: continued pretraining after conversion). The run's
model config must equal the checkpoint's but for the training-only keys (`INIT_FREE_KEYS`), and the run reads the
checkpoint's tokenizer unless data.tokenizer names one. A resumed run with checkpoints of its own loads those.

Under torchrun (`linglab.parallel.parallel_dims`, layout in `[parallel]`) every rank trains on its own rows of
the same global batch with the single-process math (global masked mean, global loads, global gradient norm),
and rank 0 alone writes the run directory. Checkpoints hold the full model (HF files) and the full AdamW state
keyed by parameter name, whatever the layout, so a run saved on N ranks resumes on M. Evaluations and samples
run on rank 0 on a single-device copy of the gathered weights while the other ranks wait.

Pipeline parallel (`--parallel.pp=S`, `linglab.parallel.pipeline`): every rank reads the whole global batch and
`PipelineRunner` runs it through the planned stages in `parallel.pp_microbatches` micro-batches (0 =
train.grad_accum), 1F1B or interleaved. Its gradient is that of the mean micro-batch loss, as the single
process accumulates it with grad_accum = the micro-batches, so a pipeline run is that run up to fp32 summation
order. The reported loss terms and the gradient norm (shared-weight copies counted once) are reduced over the
pipeline ranks, so every rank logs the same numbers and makes the same skip decision; each MoE layer's expert
bias moves on the rank whose stage holds it.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch

from linglab import checkpoint as ckpt
from linglab.config import Config, FP8Config, ModelConfig, TrainConfig
from linglab.data import DataLoader, RunData, build_data
from linglab.errors import LinglabError
from linglab.flops import flops_per_token, matmul_peak_flops
from linglab.fp8 import Fp8Monitor, Fp8Recipe
from linglab.fp8_convert import convert_to_fp8
from linglab.model import LingForCausalLM, ModelOutput, build_model, count_parameters
from linglab.moe import max_violation, update_expert_bias
from linglab.parallel.parallel_dims import ParallelDims, init_parallel
from linglab.parallel.pipeline import PipelineRunner
from linglab.parallel.planner import training_plan
from linglab.precision import compute_precision
from linglab.recompute import apply_recompute
from linglab.run import RunDir, build_adamw, releases_locks, resolve_device, rng_state, seed_everything, set_rng_state
from linglab.tasks import TIERS

STATE_NAME = "train_state.pt"
# ModelConfig keys that steer training only, so an --init-from checkpoint may differ in them from the run's model.
INIT_FREE_KEYS = (*ckpt.OPTIONAL_CONFIG_KEYS, "mtp_loss_scaling_factor")


class TrainingDiverged(LinglabError):
    """Too many consecutive non-finite steps."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR for optimizer step `step` (1-based): linear warmup, then constant (WSM) or constant + linear decay (WSD)."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "wsd":
        decay_steps = int(cfg.max_steps * cfg.decay_frac)
        decay_start = cfg.max_steps - decay_steps
        if decay_steps and step > decay_start:
            return cfg.lr * (cfg.max_steps - step) / decay_steps
    return cfg.lr


def optimizer_state_by_name(saved: dict, model, optimizer) -> dict:
    """AdamW state keyed by parameter name, as `ParallelDims.full_state` writes it.

    Checkpoints written before training under torchrun key it by position in `optimizer.param_groups`
    (`optimizer.state_dict()`); the optimizer built the same way maps positions to names.
    """
    if all(isinstance(key, str) for key in saved["state"]):
        return saved
    names = {p: name for name, p in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[i]: s for i, s in saved["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}


# ---------------------------------------------------------------- the loop


def apply_fp8(model: LingForCausalLM, cfg: FP8Config) -> Fp8Monitor | None:
    """Convert the model's FP8 GEMMs (SPEC §3) when fp8.enabled; the monitor that samples them, or None."""
    if not cfg.enabled:
        return None
    monitor = Fp8Monitor()
    recipe = Fp8Recipe(cfg.recipe, grad_blocks=cfg.grad_blocks, pow2_scales=cfg.pow2_scales)
    convert_to_fp8(model, recipe, cfg.backend, monitor, device=next(model.parameters()).device)
    return monitor


def compile_blocks(model: LingForCausalLM) -> None:
    """train.compile: torch.compile each decoder layer, the MTP layer's too, in place (torchtitan's per-block choice:
    one graph serves every layer of a kind, and the state dict keeps its names, so checkpoints are unchanged).

    Static shapes: a layer's are fixed by batch and sequence length. The MoE's varying expert segments reach only the
    grouped GEMM, which runs outside the graph (`linglab.moe.grouped_mm`), as do the FP8 autograd Functions' own
    fused quantisers. Evaluation and sampling run eagerly (`eagerly`): their shapes change from call to call.
    """
    for layer in [*model.model.layers, *model.model.mtp_layers]:
        layer.compile(dynamic=False)


def eagerly():
    """A context in which compiled layers run their eager forward (evaluation and sampling of a train.compile run)."""
    return torch.compiler.set_stance("force_eager")


def make_optimizer(model: LingForCausalLM | PipelineRunner, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the pretraining betas and weight decay (SPEC §2), over a pipeline's `parameters()` (this rank's
    stages, shared-weight copies included) under pipeline parallel."""
    return build_adamw(model.parameters(), cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)


def weighted_loss(out: ModelOutput, w_main: float, w_mtp: float, mtp_scale: float) -> torch.Tensor:
    """The training loss main + mtp_scale * MTP (+ z-loss) (SPEC §1.5), each mean rescaled to this rank's share
    of the global mean (`ParallelDims.loss_weights`)."""
    if w_main == 1.0 and w_mtp == 1.0:  # a single process, or a rank that holds exactly its share of the targets
        return out.loss
    loss = w_main * out.main_loss
    if out.mtp_loss is not None:
        loss = loss + mtp_scale * (w_mtp * out.mtp_loss)
    if out.z_loss is not None:  # a plain mean over tokens, and every rank has as many: no rescaling
        loss = loss + out.z_loss
    return loss


class Trainer:
    """Owns the state of one run: model, optimizer, loader, counters; writes through its `RunDir`.

    Each config section comes on its own (STYLE.md): `tcfg` the loop, `fp8` the monitor's cadence and thresholds.
    `model` is already converted (FP8) and parallelised (`dims`), or cut into pipeline stages (`runner`), as
    `build_trainer` prepares it; the optimizer is built here over what this rank holds. Only rank 0 writes.
    """

    def __init__(self, tcfg: TrainConfig, run: RunDir, data: RunData, model: LingForCausalLM, log=print,
                 dims: ParallelDims | None = None, runner: PipelineRunner | None = None,
                 micro_batches: int | None = None, fp8: FP8Config | None = None, fp8_monitor: Fp8Monitor | None = None):
        self.tcfg, self.run, self.data, self.model, self.runner = tcfg, run, data, model, runner
        self.fp8_cfg, self.fp8_monitor = fp8 or FP8Config(), fp8_monitor
        self.dims = dims or ParallelDims()
        self.micro_batches = micro_batches or tcfg.grad_accum
        if tcfg.batch_size % (self.micro_batches * self.dims.data_world):
            what = "pipeline micro-batches" if runner is not None else "grad_accum"
            raise LinglabError(f"train: batch_size {tcfg.batch_size} does not split evenly into {what} "
                               f"{self.micro_batches} x {self.dims.data_world} ranks")
        self.device = next(model.parameters()).device
        self.log = log if self.dims.is_main else _quiet
        self.optimizer = make_optimizer(runner if runner is not None else model, tcfg)
        self.loader = DataLoader(data.train, batch_size=tcfg.batch_size, seed=tcfg.seed)
        self.step = 0
        self.counters = {"tokens": 0, "skipped": 0, "bad_in_a_row": 0, "elapsed": 0.0}
        self.seq_len = data.train.seq_len
        self.flops_per_token = flops_per_token(model.cfg, self.seq_len)
        self.peak_flops = matmul_peak_flops(repeats=2, device=self.device) * self.dims.world
        self.tb = _tensorboard_writer(run.path) if self.dims.is_main else None
        self.fp8_warned: set[tuple[str, str]] = set()
        self._eval_model: LingForCausalLM | None = None

    # -- state

    def resume(self) -> Path | None:
        """Restore weights, optimizer, data position, RNGs and counters from the newest intact checkpoint; None if
        there is none. A checkpoint that does not load (corrupted files) is skipped with a warning for the one
        before it; if none loads, the error of the newest.

        Every rank reads the full checkpoint (a filesystem shared by the ranks) and keeps its own shards, or under
        pipeline parallel its stages.
        """
        path = self.run.load_newest(self._load_checkpoint, self.log)
        if path is not None and self.dims.is_main:
            self.run.truncate_metrics(self.step)
        return path

    def _load_checkpoint(self, path: Path) -> None:
        expected = build_model(self.model.cfg, device="meta").state_dict()  # single-device names and shapes
        model_state = ckpt.checked_state_dict(ckpt.load_hf_tensors(path), self.model.cfg, expected, str(path))
        state = self.run.load_state(path)
        try:
            if self.runner is not None:
                if not all(isinstance(key, str) for key in state["optimizer"]["state"]):
                    raise ValueError("AdamW state keyed by position, from before torchrun training: resume it on one "
                                     "process first")
                self.runner.load_full_state(model_state, self.optimizer, state["optimizer"])
            else:
                optimizer_state = optimizer_state_by_name(state["optimizer"], self.model, self.optimizer)
                self.dims.load_full_state(self.model, self.optimizer, model_state, optimizer_state)
            self.loader.load_state_dict(state["loader"])
            set_rng_state(state["rng"])
            self.step = state["step"]
            self.counters.update(state["counters"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise ckpt.CheckpointError(f"checkpoint {path}: unreadable training state ({e})") from None
        self.counters["bad_in_a_row"] = 0

    def save(self) -> Path | None:
        """A checkpoint of the full state (collective); its path on rank 0, None elsewhere."""
        model_state, optimizer_state = self._full_state(with_optimizer=True)
        state = {"step": self.step, "optimizer": optimizer_state, "loader": self.loader.state_dict(),
                 "rng": rng_state(), "counters": dict(self.counters)}

        def write() -> Path:
            bad = next((name for name, t in model_state.items() if t.is_floating_point() and not t.isfinite().all()), None)
            if bad is not None:  # a finite loss can still step to non-finite weights (an infinite LR): never saved
                last = self.run.checkpoints()
                raise TrainingDiverged(f"train: {bad} is not finite after step {self.step}, so it is not checkpointed"
                                       + (f"; last good checkpoint: {last[-1]}" if last else ""))
            return self.run.save_checkpoint(self.step, self.model, self.data.tokenizer, state, self.tcfg.keep_last,
                                            model_state=model_state)

        return self.dims.on_main(write)

    def full_model(self) -> LingForCausalLM | None:
        """The model with the current weights on one device, for evaluation: the model itself in a single process;
        under torchrun a copy on rank 0 from the gathered weights (collective), None on the other ranks."""
        if self.dims.world == 1:
            return self.model
        model_state, _ = self._full_state(with_optimizer=False)
        if not self.dims.is_main:
            return None
        if self._eval_model is None:
            self._eval_model = build_model(self.model.cfg, device=self.device)
            apply_fp8(self._eval_model, self.fp8_cfg)  # evaluated with the GEMMs it trains with, as in one process
        self._eval_model.load_state_dict(model_state)
        return self._eval_model

    def _full_state(self, with_optimizer: bool) -> tuple[dict, dict | None]:
        """Collective: the single-device model state and (optionally) the AdamW state keyed by parameter name."""
        if self.runner is None:
            return self.dims.full_state(self.model, self.optimizer if with_optimizer else None)
        return self.runner.gather(), self.runner.full_optimizer_state(self.optimizer) if with_optimizer else None

    # -- one optimizer step

    def train_step(self) -> dict:
        """Forward/backward over the micro-batches (one by one, or through the pipeline), clip, skip if non-finite,
        AdamW, bias update."""
        model, tcfg = self.model, self.tcfg
        model.train()
        moe_layers = model.moe_layers()
        for m in moe_layers:
            m.tokens_per_expert.zero_()
        lr = lr_at(self.step + 1, tcfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        dims = self.dims
        batch = self.loader.next_batch(shard=dims.data_rank, num_shards=dims.data_world, micro_batches=self.micro_batches)
        inputs, targets, mask = (t.to(self.device, non_blocking=True) for t in batch)
        keys = ("loss", "main_loss", "mtp_loss", "z_loss")
        if self.runner is None:
            sums = self._accumulate(inputs, targets, mask)
            dims.all_reduce_expert_loads(model)
            grad_norm = dims.clip_grad_norm_(model, tcfg.grad_clip)
            sums = dims.mean(sums / self.micro_batches)
        else:
            self.runner.step(inputs, targets, mask)
            dims.all_reduce_expert_loads(model)  # each layer ran on one rank: the sum is its load, on every rank
            grad_norm = self.runner.clip_grad_norm_(tcfg.grad_clip)
            sums = self.runner.loss_terms()
        sums, grad_norm = sums.tolist(), grad_norm.item()
        totals = dict(zip(keys, sums))
        finite = math.isfinite(totals["loss"]) and math.isfinite(grad_norm)
        loads = [m.tokens_per_expert for m in moe_layers]  # zeroed only at the start of the next step
        if finite:
            self.optimizer.step()
            held = None if self.runner is None else self.runner.moe_blocks()
            for m, load in zip(moe_layers, loads):
                if held is None or id(m) in held:  # a pipeline rank moves only the biases its stages route with
                    update_expert_bias(m.gate.expert_bias, load, tcfg.bias_update_rate)
            self.counters["bad_in_a_row"] = 0
        else:
            self.counters["skipped"] += 1
            self.counters["bad_in_a_row"] += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.counters["tokens"] += inputs.numel() * dims.data_world
        vios = [max_violation(load) for load in loads]
        row = {"kind": "train", "step": self.step, "tokens": self.counters["tokens"], "lr": lr,
               "grad_norm": grad_norm, "maxvio": max(vios, default=0.0), "maxvio_per_layer": vios,
               "maxvio_mtp": vios[-1] if self.model.cfg.num_nextn_predict_layers else None,
               "skipped": not finite, **totals}
        if not self.model.cfg.num_nextn_predict_layers:
            row["mtp_loss"] = None
        if self.model.cfg.router_z_loss_coef == 0:
            row["z_loss"] = None
        if self.step % tcfg.load_every == 0 or self.step == 1:
            row["expert_load"] = [(load / load.sum().clamp(min=1)).tolist() for load in loads]
        return row

    def _accumulate(self, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Forward/backward of this rank's rows micro-batch by micro-batch; the loss terms summed over them."""
        n = self.micro_batches
        micro = list(zip(inputs.chunk(n), targets.chunk(n), mask.chunk(n)))
        weights = self.dims.loss_weights([ki for _, _, ki in micro])
        sums = 0.0  # loss terms summed on the device, read once per step (one host sync on a GPU)
        for (mi, ti, ki), (w_main, w_mtp) in zip(micro, weights):
            with compute_precision(self.tcfg.precision, self.device):  # the forward only: backward follows its dtypes
                out = self.model(mi, targets=ti, loss_mask=ki)
            loss = weighted_loss(out, w_main, w_mtp, self.model.cfg.mtp_loss_scaling_factor)
            (loss / n).backward()
            terms = [loss, w_main * out.main_loss, None if out.mtp_loss is None else w_mtp * out.mtp_loss, out.z_loss]
            zero = torch.zeros_like(loss, dtype=torch.float32)
            sums = sums + torch.stack([zero if t is None else t.detach().float() for t in terms])
        return sums

    def write_metrics(self, row: dict) -> None:
        if not self.dims.is_main:
            return
        self.run.append_metrics(row)
        if self.tb is not None:
            for key, value in row.items():
                if key != "step":
                    for tag, number in _scalars(f"{row['kind']}/{key}", value):
                        self.tb.add_scalar(tag, number, row["step"])

    def write_fp8_stats(self, monitor: Fp8Monitor) -> None:
        """The safeguard monitor's sample as a metrics row; a warning the first time an op crosses a threshold."""
        self.write_metrics({"kind": "fp8", "step": self.step,
                            "ops": {name: {kind: list(v) for kind, v in ops.items()} for name, ops in monitor.stats.items()}})
        for key, line in monitor.warnings(self.fp8_cfg.underflow_warn, self.fp8_cfg.distortion_warn).items():
            if key not in self.fp8_warned:
                self.fp8_warned.add(key)
                self.log(f"[yellow]step {self.step}: {line} (thresholds: fp8.underflow_warn, fp8.distortion_warn)")

    # -- the run

    def fit(self, progress=None, task=None, evaluate=None, plain_log: bool = False) -> None:
        """Train to max_steps with checkpoints, evals and metrics; `evaluate(step)` returns an eval row.

        Every `train.log_every` steps the progress bar is refreshed, and with `plain_log` a plain line is
        logged instead (for output that is not a terminal).
        """
        tcfg = self.tcfg
        while self.step < tcfg.max_steps:
            monitor = self.fp8_monitor
            every = self.fp8_cfg.monitor_every
            sample_fp8 = monitor is not None and every and (self.step + 1) % every == 0
            start = time.perf_counter()
            if sample_fp8:
                with monitor.sampling():
                    row = self.train_step()
            else:
                row = self.train_step()
            elapsed = time.perf_counter() - start
            self.counters["elapsed"] += elapsed
            tokens = self.tcfg.batch_size * self.seq_len
            row.update(time=self.counters["elapsed"], tokens_per_s=tokens / elapsed,
                       mfu=self.flops_per_token * tokens / elapsed / self.peak_flops)
            self.write_metrics(row)
            if sample_fp8:
                self.write_fp8_stats(monitor)
            if row["skipped"]:
                self.log(f"step {self.step}: non-finite loss or gradient, step skipped "
                         f"({self.counters['bad_in_a_row']} in a row)")
                if self.counters["bad_in_a_row"] >= tcfg.max_bad_steps:
                    last = self.run.checkpoints()
                    where = f"; last good checkpoint: {last[-1]}" if last else ""
                    raise TrainingDiverged(f"train: {tcfg.max_bad_steps} non-finite steps in a row at step "
                                           f"{self.step}, stopping{where}")
            if self.step % tcfg.log_every == 0 or self.step == tcfg.max_steps:
                if progress is not None:
                    progress.update(task, completed=self.step, loss=row["loss"], tps=row["tokens_per_s"])
                if plain_log:  # not a terminal (CI, `make run > log`): the bar would print nothing until the end
                    self.log(f"step {self.step}/{tcfg.max_steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                             f"gnorm {row['grad_norm']:.3f} {row['tokens_per_s']:.0f} tok/s {self.counters['elapsed']:.0f}s")
            if evaluate is not None and tcfg.eval_every and self.step % tcfg.eval_every == 0 \
                    and self.step < tcfg.max_steps:
                row = evaluate(self.step)  # called on every rank (it may gather weights); None where nothing to write
                if row is not None:
                    self.write_metrics(row)
            if self.step % tcfg.ckpt_every == 0 or self.step == tcfg.max_steps:
                self.save()
        if self.tb is not None:
            self.tb.flush()


def _quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


def _scalars(tag: str, value):
    """(tag, number) for every number in a metrics value: nested dicts become tag paths (fp8/ops/<op>/act/0)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        yield tag, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _scalars(f"{tag}/{k}", v)
    elif isinstance(value, list) and len(value) == 2 and tag.startswith("fp8/"):  # (underflow, cosine) pairs
        yield f"{tag}/underflow", value[0]
        yield f"{tag}/cosine", value[1]


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


# ---------------------------------------------------------------- entry point


def init_state(cfg: ModelConfig, path: str | Path) -> dict[str, torch.Tensor]:
    """--init-from: checkpoint `path`'s tensors as a state dict for a model of `cfg`, refused with one line unless
    its config equals `cfg` in every key that shapes or computes the model (all but INIT_FREE_KEYS)."""
    theirs = ckpt.load_config_json(path)
    for key in ModelConfig.__dataclass_fields__:
        if key not in INIT_FREE_KEYS and getattr(theirs, key) != getattr(cfg, key):
            raise LinglabError(f"train: --init-from {path} has model.{key}={getattr(theirs, key)}, the run's model "
                               f"has {getattr(cfg, key)}; pick the preset or overrides of the checkpoint's shape")
    expected = build_model(cfg, device="meta").state_dict()
    return ckpt.checked_state_dict(ckpt.load_hf_tensors(path), cfg, expected, str(path))


def build_trainer(cfg: Config, run: RunDir, data: RunData, model: LingForCausalLM, log=print,
                  dims: ParallelDims | None = None) -> Trainer:
    """The job's wiring: FP8 conversion, then selective recompute around the converted modules (both before
    sharding), FSDP2/EP from `dims`, the pipeline plan under `parallel.pp`, then a Trainer given only the sections it
    reads."""
    dims = dims or ParallelDims()
    if dims.pp > 1 and cfg.train.precision != "fp32":
        raise LinglabError(f"train: train.precision={cfg.train.precision} is not built for pipeline parallel "
                           f"(parallel.pp={dims.pp}) yet; use train.precision=fp32 there")
    monitor = apply_fp8(model, cfg.fp8)  # converts modules in place: before sharding
    apply_recompute(model, cfg.train.recompute)
    if cfg.train.compile:
        compile_blocks(model)
    model = dims.parallelize(model)
    runner, micro_batches = None, cfg.train.grad_accum
    if dims.pp > 1:  # every rank keeps the full model; its stages hold (and train) this rank's share of it
        par = cfg.parallel
        micro_batches = par.pp_microbatches or cfg.train.grad_accum
        plan = training_plan(cfg.model, cfg.data.seq_len, par.pp, par.pp_virtual, par.pp_plan)
        runner = PipelineRunner(model, plan, None, micro_batches)
        if dims.is_main:
            log(f"pipeline ({par.pp_plan}, {par.pp} ranks x {par.pp_virtual} virtual): {plan.stages}")
    return Trainer(cfg.train, run, data, model, log=log, dims=dims, runner=runner, micro_batches=micro_batches,
                   fp8=cfg.fp8, fp8_monitor=monitor)


@releases_locks
def run_training(cfg: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
                 command: str = "", console=None, init_from: str | Path | None = None) -> dict:
    """The whole job: data, model, training loop, final checkpoint, evaluation, samples, report.

    `init_from`: a checkpoint whose weights the new model starts from (`init_state`); see the module docstring.

    Under torchrun every rank runs this; rank 0 alone prints and writes (SPEC §7, `ParallelDims`).
    """
    dims = init_parallel(cfg.parallel, resolve_device(cfg.train.device))
    try:
        return _run(cfg, RunDir(run_dir, "train", STATE_NAME), dims, resume, overwrite, command, console, init_from)
    finally:
        dims.close()


def _run(cfg: Config, run: RunDir, dims: ParallelDims, resume: bool, overwrite: bool, command: str, console,
         init_from: str | Path | None) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from linglab import evals, report

    console = console or Console()
    if not dims.is_main:
        console = Console(quiet=True)

    def check() -> dict:
        # --overwrite would delete user data or a tokenizer kept inside the run being replaced
        inputs = [] if resume else [p for p in (cfg.data.path, cfg.data.tokenizer, init_from) if p]
        run.check(resume, overwrite, inputs)
        run.lock()
        return run.resume_changes(cfg) if resume else {}

    init = None
    if init_from is not None and not (resume and run.checkpoints()):  # the run's own checkpoints win
        init = init_state(cfg.model, init_from)  # checked before --out is touched
        if not cfg.data.tokenizer and (Path(init_from) / "tokenizer.json").is_file():
            cfg = copy.deepcopy(cfg)  # the caller's config stays as given
            cfg.data.tokenizer = str(Path(init_from) / "tokenizer.json")  # its token ids are the ones it learned
    changes = dims.on_main(check)
    seed_everything(cfg.train.seed)
    # Every input is read and checked before --out is touched; rank 0 trains the tokenizer, the others load it.
    data = dims.on_main(lambda: _load_data(cfg, run, resume))
    try:
        dims.on_main(lambda: _begin(cfg, run, data, resume, overwrite))
        if data is None:
            data = build_data(cfg.data, run.path, cfg.train.eval_problems, save_tokenizer=False)
        model = build_model(cfg.model, device=dims.device, seed=cfg.train.seed)  # the same weights on every rank
        if init is not None:
            model.load_state_dict(init)  # before FP8 conversion and sharding, which keep the weights they find
            dims.on_main(lambda: run.append_metrics({"kind": "init", "step": 0, "from": str(init_from)}))
        counts = count_parameters(model)
        trainer = build_trainer(cfg, run, data, model, log=console.print, dims=dims)
        if resume:
            resumed_from = trainer.resume()
            console.print(f"resumed from {resumed_from}" if resumed_from else "no checkpoint yet: starting from step 0")

            def record_resume() -> None:  # only now, with the resume known to succeed, is the run written
                if resumed_from is None:
                    run.truncate_metrics(0)
                run.write_config(cfg)
                run.append_metrics({"kind": "resume", "step": trainer.step, "from": str(resumed_from),
                                    "changes": {k: list(v) for k, v in changes.items()}, "command": command})
                for key, (old, new) in changes.items():
                    console.print(f"resume: {key} {old} -> {new}")

            dims.on_main(record_resume)
    except BaseException:
        if dims.is_main:
            run.rollback()
        raise
    dims.on_main(run.commit)
    if dims.is_main:
        run.write_json("params.json", counts.__dict__)

    def evaluate(step: int) -> dict | None:
        full = trainer.full_model()
        if full is None:
            return None
        with eagerly():
            return evals.evaluate_run(full, data, step)

    layout = f"pp={dims.pp}" if dims.pp > 1 else f"dp={dims.dp}, ep={dims.ep}"
    ranks = f" on {dims.world} ranks ({layout})" if dims.world > 1 else ""
    console.print(f"training {counts.total / 1e6:.2f}M parameters ({counts.active / 1e6:.2f}M active) on "
                  f"{len(data.train)} sequences of {cfg.data.seq_len} tokens{ranks} -> {run.path}")
    columns = [TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
               TextColumn("{task.fields[tps]:.0f} tok/s"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=cfg.train.max_steps, completed=trainer.step, loss=float("nan"), tps=0.0)
        trainer.fit(progress, task, evaluate, plain_log=not console.is_terminal)

    summary = {"steps": trainer.step, "tokens": trainer.counters["tokens"], "wall_time_s": trainer.counters["elapsed"],
               "skipped_steps": trainer.counters["skipped"], "final_checkpoint": str(run.final_path), "command": command,
               "init_from": None if init is None else str(init_from), "corpus": data.corpus}
    model = trainer.full_model()  # the run's last collective
    dims.barrier()  # ... finished on every rank: the others may leave while rank 0 evaluates and reports
    if not dims.is_main:
        return summary

    run.finalize()
    with eagerly():
        final_eval = evals.evaluate_run(model, data, trainer.step)
        samples = evals.sample_completions(model, data, cfg.train.num_samples)
    trainer.write_metrics(final_eval)
    tiers = {TIERS[t].name: {"accuracy": final_eval["accuracy"][TIERS[t].name], "n": len(data.heldout_problems[t]),
                             "description": TIERS[t].description} for t in data.heldout_problems}
    run.write_json("final_eval.json", {"step": trainer.step, "heldout_loss": final_eval.get("heldout_loss"), "tiers": tiers})
    run.write_json("samples.json", samples)
    run.write_json("summary.json", summary)
    report_path = report.write_report(run.path)  # draws the plots too
    for name, tier in tiers.items():
        console.print(f"held-out {name:7s} exact match {tier['accuracy']:.1%} (n={tier['n']})")
    console.print(f"report: {report_path}")
    return summary


def _load_data(cfg: Config, run: RunDir, resume: bool) -> RunData:
    """The run's data, read and checked without writing: a resumed run reuses its own tokenizer.json."""
    data = build_data(cfg.data, run.path, cfg.train.eval_problems, save_tokenizer=False, reuse_saved=resume)
    if data.tokenizer.vocab_size > cfg.model.vocab_size:
        raise LinglabError(f"train: tokenizer has {data.tokenizer.vocab_size} tokens but model.vocab_size is "
                           f"{cfg.model.vocab_size}")
    if len(data.train) < cfg.train.batch_size:
        raise LinglabError(f"train: the data has {len(data.train)} rows of {cfg.data.seq_len} tokens, fewer than "
                           f"train.batch_size={cfg.train.batch_size}; add data or lower the batch size")
    recorded = run.path / "corpus.json"
    if resume and data.corpus is not None and recorded.is_file():
        started = json.loads(recorded.read_text())
        if started.get("sha256") != data.corpus["sha256"]:
            raise LinglabError(f"train: data.corpus {data.corpus['name']} is not the text this run started on (sha256 "
                               f"{data.corpus['sha256'][:12]}, the run's {str(started.get('sha256'))[:12]}: another "
                               f"Python installation?); resume where it started or start a new run")
    return data


def _begin(cfg: Config, run: RunDir, data: RunData, resume: bool, overwrite: bool) -> None:
    """Rank 0 starts writing: a new run gets its config.toml and tokenizer.json (which the other ranks then load)."""
    run.begin(resume, overwrite)
    if not resume:
        run.write_config(cfg)
        data.tokenizer.save(run.path / "tokenizer.json")
        if data.corpus is not None:
            run.write_json("corpus.json", data.corpus)  # exactly what the run trains on (linglab.corpora)

