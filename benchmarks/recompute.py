"""Peak memory and step time of a training forward+backward per `train.recompute` setting, `small` at a long sequence.

Each setting (`none`, `mtp`, `experts`, `full`, `linglab.recompute`) runs in a fresh Python process on the same
model (seed 0) and batch. Its step memory is the peak resident set during its first forward+backward (VmHWM, reset
through /proc/self/clear_refs just before it) minus the resident set just before it, when the weights exist and
the gradients and activations do not: what the step adds, activations, gradients and the working set of the
kernels. The process's whole peak RSS, and the activation bytes autograd keeps for backward (the storages its
saved-tensor hooks see, weights left out: independent of the allocator), are recorded beside it. Step time is the
median of the later steps, as CPU time (`time.process_time`; one thread, so it counts this step's work, not the
waits for other jobs on a shared machine) and wall time. All settings compute the same loss, checked here
(`tests/test_recompute.py` checks the gradients bit for bit).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recompute.py [--preset small --seq-len 4096 --batch-size 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, report  # noqa: E402

MODES = ("none", "mtp", "experts", "full")
GIB = 1 << 30


def _status_bytes(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(mode: str, preset: str, seq_len: int, batch_size: int, steps: int) -> dict:
    """In this process: the model with `mode`, then forward+backward `steps` times on one fixed batch."""
    from linglab.config import load_config
    from linglab.model import build_model
    from linglab.recompute import apply_recompute

    cfg = load_config(preset, overrides=[f"--data.seq_len={seq_len}"]).model
    model = build_model(cfg, seed=0).train()
    apply_recompute(model, mode)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        out = model(ids[:, :-1], targets=ids[:, 1:])
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return out.loss.item()

    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on is the step's
    loss = step()
    step_peak = _status_bytes("VmHWM") - before
    wall, cpu = [], []
    for _ in range(steps - 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}  # storage -> bytes: a tensor saved by several ops, or views of one, count once; weights not at all

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids[:, :-1], targets=ids[:, 1:])  # the graph is dropped unused
    return {"mode": mode, "loss": loss, "step_peak_gib": step_peak / GIB, "rss_before_step_gib": before / GIB,
            "process_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
            "saved_for_backward_gib": sum(kept.values()) / GIB, "step_s": statistics.median(wall),
            "step_cpu_s": statistics.median(cpu), "threads": torch.get_num_threads()}


def run_child(mode: str, args) -> dict:
    """`measure` in a fresh interpreter, so no setting's freed memory hides the next one's peak."""
    cmd = [sys.executable, __file__, "--child", mode, "--preset", args.preset, "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(cases: dict[str, dict], path: Path, title: str) -> None:
    from linglab.plots import FIGSIZE, plt, save

    fig, axes = plt.subplots(1, 2, figsize=(2 * FIGSIZE[0], FIGSIZE[1]), layout="constrained")
    for ax, key, label in ((axes[0], "step_peak_gib", "step peak memory (GiB)"), (axes[1], "step_cpu_s", "step CPU time (s)")):
        ax.bar(list(cases), [c[key] for c in cases.values()], color="tab:blue")
        ax.set(xlabel="train.recompute", ylabel=label)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="forward+backward steps per setting (>= 2: the first is "
                                                               "the memory one; the median of the rest is the time)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.preset, args.seq_len, args.batch_size, args.steps)))
        return

    cases = {mode: run_child(mode, args) for mode in MODES}
    if len({c["loss"] for c in cases.values()}) != 1:
        raise SystemExit(f"the settings computed different losses: {[c['loss'] for c in cases.values()]}")
    none = cases["none"]
    print(f"{args.preset}, {args.batch_size} x {args.seq_len} tokens, {none['threads']} threads, loss "
          f"{none['loss']:.4f} in every setting")
    for mode, c in cases.items():
        print(f"{mode:8s} step peak {c['step_peak_gib']:.3f} GiB ({c['step_peak_gib'] / none['step_peak_gib']:.2f}x)  "
              f"kept for backward {c['saved_for_backward_gib']:.3f} GiB  process peak {c['process_peak_gib']:.3f} GiB  "
              f"step CPU {c['step_cpu_s']:.1f} s ({c['step_cpu_s'] / none['step_cpu_s']:.2f}x), wall {c['step_s']:.1f} s")
    ratio = {mode: c["step_peak_gib"] / none["step_peak_gib"] for mode, c in cases.items()}
    time_ratio = {mode: c["step_cpu_s"] / none["step_cpu_s"] for mode, c in cases.items()}
    plot(cases, RESULTS_DIR / "recompute.png",
         f"train.recompute on {args.preset}, {args.batch_size} x {args.seq_len} tokens (CPU)")
    report("recompute", {"peak_memory_ratio_full": (ratio["full"], 0.5), "step_cpu_time_ratio_full": (time_ratio["full"], "-")},
           {"preset": args.preset, "seq_len": args.seq_len, "batch_size": args.batch_size,
            "step_peak_memory_ratio": ratio, "step_cpu_time_ratio": time_ratio,
            "process_peak_ratio_full": cases["full"]["process_peak_gib"] / none["process_peak_gib"],
            "cases": cases})


if __name__ == "__main__":
    main()
