"""The run layer: what every job (pretraining, SFT, RL, the scaling sweep) does on disk, with RNGs and devices.

Jobs differ in their loop, not in how they touch the disk (STYLE.md, nanochat's `checkpoint_manager.py`):

    run = RunDir("runs/tiny", command="train")
    run.prepare(resume=False, overwrite=False)       # refuses an existing run unless --resume / --overwrite
    run.write_config(cfg)                            # config.toml, the resolved config
    run.append_metrics(row)                          # one JSON line of metrics.jsonl
    run.save_checkpoint(step, model, tokenizer, state, keep_last=3)   # checkpoints/step_NNNNNN/, atomic, pruned
    state = run.load_state(run.checkpoints()[-1])    # the job's state (optimizer, RNGs, data position, ...)
    run.truncate_metrics(state["step"])              # a resumed run rewrites the lines after its checkpoint
    run.finalize()                                   # final/ = the last checkpoint's model files and tokenizer

A checkpoint is an HF checkpoint (SPEC §1.6: config.json, model.safetensors) plus the tokenizer (tokenizer.json,
tokenizer_config.json) and one torch file of job state (`state_name`: train_state.pt for pretraining, rl_state.pt
for RL), written to a temporary directory and renamed into place, so a kill at any moment leaves the previous
checkpoints intact.

Also here: `seed_everything` / `rng_state` / `set_rng_state`, `resolve_device`, `build_adamw` (the one AdamW
builder of every job) and `read_jsonl` (the one reader of metrics and results files).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import random
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from linglab import checkpoint as ckpt
from linglab.config import to_toml
from linglab.errors import LinglabError
from linglab.tokenizer import FILE_NAME as TOKENIZER_NAME
from linglab.tokenizer import copy_tokenizer_files

CONFIG_TOML = "config.toml"
METRICS_NAME = "metrics.jsonl"
FINAL_NAME = "final"


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON-object lines of a file, in order. Unparsable lines are skipped: a kill can cut the last line short,
    and a resumed run appends after it, so such a line can also sit mid-file. NaN/Infinity parse as floats."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def check_output(path: str | Path, overwrite: bool, command: str, inputs: Iterable[str | Path] = ()) -> None:
    """The rules of every command's --out, checked before anything is read into it or deleted: a directory (or
    absent), never equal to, inside or around one of the command's inputs (--overwrite would delete the input,
    and what a job writes must not land in what it reads), and empty unless --overwrite."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LinglabError(f"{command}: --out {path} is a file, expected a directory")
    out = path.resolve()
    for source in inputs:
        src = Path(source).resolve()
        if src == out or out in src.parents or src in out.parents:
            raise LinglabError(f"{command}: --out {path} overlaps the input {source}; write to another directory")
    if not overwrite and path.is_dir() and any(path.iterdir()):
        raise LinglabError(f"{command}: {path} exists and is not empty (pass --overwrite to replace it)")


_HELD: set = set()  # RunDirs whose lock this process holds


def releases_locks(job):
    """For a job's entry point: the run locks it took are released when it returns or fails, so the same process
    (a test, a pipeline resumed in-process) can open the run again."""

    @functools.wraps(job)
    def wrapper(*args, **kwargs):
        held = set(_HELD)
        try:
            return job(*args, **kwargs)
        finally:
            for run in _HELD - held:
                run.unlock()

    return wrapper


class RunDir:
    """One job's directory: config.toml, metrics.jsonl, tokenizer(_config).json, checkpoints/step_NNNNNN/, final/.

    `command` names the subcommand in errors; `state_name` is the job-state file of each checkpoint, whose
    presence marks the checkpoint complete.
    """

    def __init__(self, path: str | Path, command: str = "train", state_name: str = "train_state.pt"):
        self.path, self.command, self.state_name = Path(path), command, state_name

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_NAME

    @property
    def final_path(self) -> Path:
        return self.path / FINAL_NAME

    def exists(self) -> bool:
        return self.path.is_dir() and any(self.path.iterdir())

    # ------------------------------------------------------------ the directory, safely

    def check(self, resume: bool, overwrite: bool, inputs: Iterable[str | Path] = ()) -> None:
        """Every rule about --out, before anything is read into it or deleted (writes nothing).

        --out must be a directory (or not exist yet); --resume needs a run there, a new start an empty or absent
        --out unless --overwrite; and --out may neither be nor contain an input, nor lie inside one: --overwrite
        would delete it, and what a job writes must not land in what it reads.
        """
        if self.path.exists() and not self.path.is_dir():
            raise LinglabError(f"{self.command}: --out {self.path} is a file, expected a directory")
        exists = self.exists()
        if resume and not exists:
            raise LinglabError(f"{self.command}: --resume given but {self.path} has no run to resume")
        if exists and not (resume or overwrite):
            hint = "use --resume to continue it or --overwrite to start over" if self.command != "sft" else "use --overwrite"
            raise LinglabError(f"{self.command}: {self.path} already holds a run ({hint})")
        check_output(self.path, True, self.command, inputs)

    def lock(self) -> None:
        """Hold an exclusive lock on this run for the life of the process (or until `unlock`).

        The lock is a file beside the run (`.<name>.lock`), so it outlives --overwrite; the kernel drops it when the
        process dies, kill -9 included, so a stale lock needs no cleanup. Once held, leftovers of a killed writer
        are tidied: temporary checkpoint directories, half-pruned checkpoints, a run set aside by --overwrite.
        """
        if getattr(self, "_lock", None) is not None:
            return
        lock_path = self.path.parent / f".{self.path.name}.lock"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock_path, "a+")
        except OSError as e:
            raise LinglabError(f"{self.command}: cannot write --out {self.path} ({e.strerror or e})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise LinglabError(f"{self.command}: {self.path} is in use by {holder}; wait for it to finish") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"linglab {self.command} (pid {os.getpid()})")
        handle.flush()
        self._lock = handle
        _HELD.add(self)
        self._tidy()

    def unlock(self) -> None:
        handle, self._lock = getattr(self, "_lock", None), None
        _HELD.discard(self)
        if handle is not None:
            handle.close()

    def _tidy(self) -> None:
        """Remove what a killed writer left (only under the lock: no writer is alive)."""
        for old in sorted(self.path.parent.glob(f".{self.path.name}.old-*")):
            # A start killed between setting the old run aside and committing: its half-made run goes, the old one
            # comes back, as a failed start would have left it.
            if self.path.exists():
                shutil.rmtree(self.path)
            os.rename(old, self.path)
        for root in (self.path, self.path / "checkpoints"):
            if root.is_dir():
                for junk in root.iterdir():
                    if junk.is_dir() and junk.name.startswith(".") and (".tmp-" in junk.name or ".old-" in junk.name
                                                                         or junk.name.endswith(".deleting")):
                        shutil.rmtree(junk, ignore_errors=True)

    def begin(self, resume: bool, overwrite: bool) -> None:
        """Start writing, after `check` and after every input was read and validated. A new run's --out is created;
        with --overwrite the old run is set aside first, and `rollback` puts it back, `commit` deletes it."""
        self.lock()
        self._aside = None
        self._created = False
        if resume:
            return
        if self.exists():
            if not overwrite:
                raise LinglabError(f"{self.command}: {self.path} already holds a run (use --overwrite)")
            self._aside = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.rename(self.path, self._aside)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.rollback()
            raise LinglabError(f"{self.command}: cannot write --out {self.path} ({e.strerror or e})") from None
        self._created = True

    def commit(self) -> None:
        """The start succeeded: the run set aside by --overwrite is deleted."""
        aside, self._aside, self._created = getattr(self, "_aside", None), None, False
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    def rollback(self) -> None:
        """The start failed: --out is left as it was found (a new directory removed, an overwritten run restored)."""
        if getattr(self, "_created", False):
            shutil.rmtree(self.path, ignore_errors=True)
        aside, self._aside, self._created = getattr(self, "_aside", None), None, False
        if aside is not None:
            os.rename(aside, self.path)

    def prepare(self, resume: bool, overwrite: bool, inputs: Iterable[str | Path] = ()) -> None:
        """`check` then `begin` and `commit` at once: for jobs whose inputs are all validated already."""
        self.check(resume, overwrite, inputs)
        self.begin(resume, overwrite)
        self.commit()

    def stored_config(self):
        """The run's own config.toml as a Config: the source of truth of a resumed run."""
        from linglab.config import load_config

        path = self.path / CONFIG_TOML
        if not path.is_file():
            raise LinglabError(f"{self.command}: {self.path} has no {CONFIG_TOML}; it is not a linglab run to resume")
        return load_config(preset=None, path=path)

    def resume_changes(self, cfg) -> dict[str, tuple]:
        """{key: (stored, given)} of what `cfg` changes in the run's config.toml, if every change is one a resumed run
        may make (RESUME_SAFE: cadence, evaluation, layout, device; a WSM run's or an RL run's length, extended);
        otherwise a one-line error naming the first key that would change what was trained."""
        stored = self.stored_config()
        changes = {key: (old, new) for key, old, new in config_diff(stored, cfg)}
        for key, (old, new) in changes.items():
            if key in ("train.max_steps", "rl.steps"):
                if new < old:
                    raise LinglabError(f"{self.command}: --resume cannot shorten {key} ({old} -> {new}); it may only grow")
                if key == "train.max_steps" and cfg.train.schedule != "wsm":
                    raise LinglabError(f"{self.command}: --resume cannot change train.max_steps ({old} -> {new}) of a "
                                       "WSD run: its decay is a fraction of max_steps (a WSM run can be extended)")
            elif not (key in RESUME_SAFE or key.startswith(("parallel.", "eval."))):
                raise LinglabError(f"{self.command}: --resume cannot change {key} ({old!r} -> {new!r}): it changes what "
                                   f"{self.path} was trained with (start a new run, or resume without it)")
        return changes

    def write_config(self, cfg) -> None:
        (self.path / CONFIG_TOML).write_text(to_toml(cfg))

    def write_json(self, name: str, obj) -> Path:
        path = self.path / name
        path.write_text(json.dumps(obj, indent=2) + "\n")
        return path

    # ------------------------------------------------------------ metrics

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict]:
        """Every row of metrics.jsonl in file order ([] before the first one)."""
        return read_jsonl(self.metrics_path) if self.metrics_path.is_file() else []

    def truncate_metrics(self, step: int) -> None:
        """Keep the rows up to `step` (and drop torn lines): a resumed run rewrites the ones after its checkpoint."""
        if not self.metrics_path.is_file():
            return
        kept = [row for row in self.read_metrics() if row.get("step", 0) <= step]
        self.metrics_path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    # ------------------------------------------------------------ checkpoints

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first: every file present (a write is atomic, a prune renames before it
        deletes, so a killed writer leaves no partial `step_*` directory; this also guards against a hand-made one)."""
        root = self.path / "checkpoints"
        if not root.is_dir():
            return []
        files = (ckpt.CONFIG_NAME, ckpt.WEIGHTS_NAME, TOKENIZER_NAME, self.state_name)
        return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                      and all((p / f).is_file() for f in files))

    def save_checkpoint(self, step: int, model, tokenizer, state: dict, keep_last: int,
                        model_state: dict | None = None) -> Path:
        """HF model files + the tokenizer files + the job state, written atomically; prunes all but the last `keep_last`.

        `model_state`: the full single-device state dict when `model` holds only shards (`ParallelDims.full_state`).
        """
        out = self.path / "checkpoints" / f"step_{step:06d}"

        def write(tmp: Path) -> None:
            ckpt.write_model_files(model, tmp, state_dict=model_state)
            tokenizer.save(tmp / TOKENIZER_NAME)
            torch.save(state, tmp / self.state_name)

        ckpt.write_atomically(out, write)
        for old in self.checkpoints()[:-keep_last]:  # renamed first: a kill mid-delete leaves no step_* remnant
            doomed = old.with_name(f".{old.name}.deleting")
            os.rename(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        return out

    def load_state(self, path: Path) -> dict:
        """The job state of checkpoint `path`, or a one-line error when it cannot be read."""
        try:
            state = torch.load(path / self.state_name, weights_only=False, map_location="cpu")
        except Exception as e:  # random bytes fail in pickle, zip or torch alike: all are one line
            raise ckpt.CheckpointError(f"checkpoint {path}: unreadable {self.state_name} ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or "step" not in state:
            raise ckpt.CheckpointError(f"checkpoint {path}: {self.state_name} is not a linglab job state")
        return state

    def load_newest(self, load, log=print) -> Path | None:
        """Call `load(path)` on the newest checkpoint, falling back, with a warning, to the one before it while it raises
        CheckpointError (a corrupted file); the checkpoint that loaded, None when there is none, or one line when
        none loads."""
        first_error = None
        for path in reversed(self.checkpoints()):
            try:
                load(path)
            except ckpt.CheckpointError as e:
                first_error = first_error or e
                log(f"[yellow]warning: {e}; trying the checkpoint before it")
                continue
            return path
        if first_error is not None:
            raise ckpt.CheckpointError(f"{self.command}: no checkpoint of {self.path} loads; the newest: {first_error}")
        return None

    def finalize(self, source: Path | None = None) -> Path:
        """final/: the model files and tokenizer of `source` (default: the last checkpoint), written atomically."""
        source = source or self.checkpoints()[-1]
        ckpt.write_atomically(self.final_path, lambda tmp: copy_model_files(source, tmp))
        return self.final_path


# What a resumed run may change (`RunDir.resume_changes`): how often it logs, evaluates and checkpoints, where it runs
# and on how many ranks (checkpoints are layout-agnostic; RL's rollout ranks and their lag too, which restarts at a
# resume), what it recomputes and whether its layers run compiled (the same numbers), and the [eval] section of
# `linglab eval`. Everything else changes what was trained.
RESUME_SAFE = frozenset({
    "train.log_every", "train.eval_every", "train.eval_problems", "train.ckpt_every", "train.keep_last",
    "train.load_every", "train.num_samples", "train.max_bad_steps", "train.device", "train.recompute", "train.compile",
    "fp8.monitor_every", "fp8.underflow_warn", "fp8.distortion_warn", "rl.ckpt_every", "rl.keep_last",
    "rl.rollout_ranks", "rl.max_staleness"})


def config_diff(a, b) -> list[tuple[str, object, object]]:
    """(section.key, value in a, value in b) for every key where two Configs differ."""
    da, db = a.to_dict(), b.to_dict()
    return [(f"{section}.{key}", da[section][key], db[section][key])
            for section in da for key in da[section] if da[section][key] != db[section][key]]


def copy_model_files(src: Path, dst: Path) -> None:
    """An HF checkpoint's config.json, model.safetensors and tokenizer files from `src` into `dst`."""
    for name in (ckpt.CONFIG_NAME, ckpt.WEIGHTS_NAME):
        shutil.copy2(src / name, dst / name)
    copy_tokenizer_files(src, dst)


# ---------------------------------------------------------------- RNGs, devices, the optimizer


def seed_everything(seed: int) -> None:
    """Seed torch, Python's `random` and numpy alike (the start of every job)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict:
    """Every global RNG's state, for a checkpoint (CUDA's only when it is in use)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(name: str, command: str = "train") -> torch.device:
    """`train.device` as a torch.device: "auto" is cuda when one is visible; a missing GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LinglabError(f"{command}: train.device={name} but torch sees no CUDA device (use train.device=cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise LinglabError(f"{command}: train.device={name} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def refuse_pretraining_only_keys(tcfg, command: str) -> None:
    """SFT and RL train in fp32, eagerly, without recompute: a train.precision, train.recompute or train.compile given
    to them is refused with one line instead of being ignored."""
    for key, default in (("precision", "fp32"), ("recompute", "none"), ("compile", False)):
        if getattr(tcfg, key) != default:
            raise LinglabError(f"{command}: train.{key}={getattr(tcfg, key)} applies to `linglab train` only; "
                               f"{command} trains with train.{key}={default}")


def build_adamw(parameters: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float],
                weight_decay: float) -> torch.optim.AdamW:
    """AdamW (SPEC §2 for pretraining, §5 for RL) with weight decay on matrices only: none on norms and other
    1-D weights, as is standard. The router's expert bias is a buffer, so no optimizer ever moves it."""
    parameters = list(parameters)
    decay = [p for p in parameters if p.dim() >= 2]
    no_decay = [p for p in parameters if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, foreach=True)
