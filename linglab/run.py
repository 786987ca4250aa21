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

A checkpoint is an HF checkpoint (SPEC §1.6: config.json, model.safetensors) plus tokenizer.json and one torch
file of job state (`state_name`: train_state.pt for pretraining, rl_state.pt for RL), written to a temporary
directory and renamed into place, so a kill at any moment leaves the previous checkpoints intact.

Also here: `seed_everything` / `rng_state` / `set_rng_state`, `resolve_device`, `build_adamw` (the one AdamW
builder of every job) and `read_jsonl` (the one reader of metrics and results files).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from linglab import checkpoint as ckpt
from linglab.config import to_toml
from linglab.errors import LinglabError

CONFIG_TOML = "config.toml"
METRICS_NAME = "metrics.jsonl"
TOKENIZER_NAME = "tokenizer.json"
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


class RunDir:
    """One job's directory: config.toml, metrics.jsonl, tokenizer.json, checkpoints/step_NNNNNN/, final/.

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

    # ------------------------------------------------------------ the directory

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Refuse to clobber an existing run unless asked; --resume needs an existing run."""
        if self.path.exists() and not self.path.is_dir():
            raise LinglabError(f"{self.command}: --out {self.path} is a file, expected a directory")
        exists = self.exists()
        if resume:
            if not exists:
                raise LinglabError(f"{self.command}: --resume given but {self.path} has no run to resume")
            return
        if exists and not overwrite:
            hint = "use --resume to continue it or --overwrite to start over" if self.command != "sft" else "use --overwrite"
            raise LinglabError(f"{self.command}: {self.path} already holds a run ({hint})")
        if exists:
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

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
        """Complete checkpoints, oldest first (temporary directories of an interrupted write are ignored)."""
        root = self.path / "checkpoints"
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                      and (p / self.state_name).is_file())

    def save_checkpoint(self, step: int, model, tokenizer, state: dict, keep_last: int,
                        model_state: dict | None = None) -> Path:
        """HF model files + tokenizer.json + the job state, written atomically; prunes all but the last `keep_last`.

        `model_state`: the full single-device state dict when `model` holds only shards (`ParallelDims.full_state`).
        """
        out = self.path / "checkpoints" / f"step_{step:06d}"

        def write(tmp: Path) -> None:
            ckpt.write_model_files(model, tmp, state_dict=model_state)
            tokenizer.save(tmp / TOKENIZER_NAME)
            torch.save(state, tmp / self.state_name)

        ckpt.write_atomically(out, write)
        for old in self.checkpoints()[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return out

    def load_state(self, path: Path) -> dict:
        """The job state of checkpoint `path`, or a one-line error when it cannot be read."""
        try:
            state = torch.load(path / self.state_name, weights_only=False, map_location="cpu")
        except (OSError, RuntimeError, ValueError, EOFError, ImportError, AttributeError) as e:
            raise ckpt.CheckpointError(f"checkpoint {path}: unreadable {self.state_name} ({e})") from None
        if not isinstance(state, dict) or "step" not in state:
            raise ckpt.CheckpointError(f"checkpoint {path}: {self.state_name} is not a linglab job state")
        return state

    def finalize(self, source: Path | None = None) -> Path:
        """final/: the model files and tokenizer of `source` (default: the last checkpoint), written atomically."""
        source = source or self.checkpoints()[-1]
        ckpt.write_atomically(self.final_path, lambda tmp: copy_model_files(source, tmp))
        return self.final_path


def copy_model_files(src: Path, dst: Path) -> None:
    """An HF checkpoint's config.json, model.safetensors and tokenizer.json from `src` into `dst`."""
    for name in (ckpt.CONFIG_NAME, ckpt.WEIGHTS_NAME, TOKENIZER_NAME):
        shutil.copy2(src / name, dst / name)


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


def build_adamw(parameters: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float],
                weight_decay: float) -> torch.optim.AdamW:
    """AdamW (SPEC §2 for pretraining, §5 for RL) with weight decay on matrices only: none on norms and other
    1-D weights, as is standard. The router's expert bias is a buffer, so no optimizer ever moves it."""
    parameters = list(parameters)
    decay = [p for p in parameters if p.dim() >= 2]
    no_decay = [p for p in parameters if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, foreach=True)
