"""Full training steps vs the bare forward+backward: what everything around the model costs.

`full` is `Trainer.fit` on the `tiny` preset exactly as `linglab train` runs it: the loader's next
batch, forward+backward, grad clipping, AdamW, the expert-bias update, MaxVio, a metrics.jsonl line
(and TensorBoard scalars when installed) every step, and a checkpoint every `train.ckpt_every` steps,
amortised over the steps it covers. `bare` is the foundation benchmark's step (benchmarks/train_step.py):
forward+backward on a fixed batch of the same shape, nothing else.

    overhead = full seconds per step / bare seconds per step - 1

The two are measured in alternating rounds in one process and the medians compared.

    .venv/bin/python benchmarks/train_throughput.py [--steps 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_peak_flops, report  # noqa: E402

from linglab.config import load_config  # noqa: E402
from linglab.data import build_data  # noqa: E402
from linglab.flops import flops_per_token  # noqa: E402
from linglab.model import build_model  # noqa: E402
from linglab.run import RunDir  # noqa: E402
from linglab.train import build_trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps per round (default: one checkpoint interval)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    cfg = load_config("tiny", overrides=[f"--train.ckpt_every={args.steps}", "--train.eval_every=0",
                                         "--data.num_documents=8000"])
    batch, seq = cfg.train.batch_size, cfg.data.seq_len
    peak = matmul_peak_flops()
    fpt = flops_per_token(cfg.model, seq)
    print(f"fp32 matmul peak in this process: {peak / 1e9:.1f} GFLOP/s; tiny preset, batch {batch} x {seq}, "
          f"checkpoint every {args.steps} steps")

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        data = build_data(cfg.data, run_dir, eval_problems=8)
        model = build_model(cfg.model, seed=0)
        trainer = build_trainer(cfg, RunDir(run_dir), data, model, log=lambda *a: None)

        bare_model = build_model(cfg.model, seed=0)
        ids = data.train.tokens[:batch].long()
        mask = data.train.loss_mask[:batch, 1:].float()

        def bare_step():
            bare_model(ids[:, :-1], targets=ids[:, 1:], loss_mask=mask).loss.backward()
            bare_model.zero_grad(set_to_none=True)

        bare_step()
        trainer.tcfg.max_steps = 5  # warm up the trainer (allocator, optimizer state) outside the timing
        trainer.fit()
        trainer.step = 0  # so that each round ends on exactly one checkpoint, as in a real run
        full, bare = [], []
        for r in range(args.rounds):
            trainer.tcfg.max_steps = trainer.step + args.steps
            start = time.perf_counter()
            trainer.fit()
            full.append((time.perf_counter() - start) / args.steps)
            times = []
            for _ in range(max(args.steps // 5, 5)):
                start = time.perf_counter()
                bare_step()
                times.append(time.perf_counter() - start)
            bare.append(statistics.median(times))
            print(f"round {r + 1}: full {full[-1] * 1e3:.1f} ms/step, bare {bare[-1] * 1e3:.1f} ms/step")

    full_s, bare_s = statistics.median(full), statistics.median(bare)
    tokens = batch * seq
    overhead = full_s / bare_s - 1
    rows = {name: {"seconds_per_step": s, "tokens_per_s": tokens / s, "mfu": fpt * tokens / s / peak}
            for name, s in (("full", full_s), ("bare", bare_s))}
    for name, row in rows.items():
        print(f"{name:5s} {row['seconds_per_step'] * 1e3:7.1f} ms/step  {row['tokens_per_s']:8.0f} tokens/s  "
              f"MFU {row['mfu']:.1%}")
    report("train_throughput", {"train_overhead": (overhead, 0.10),
                                "tokens_per_s_full": (rows["full"]["tokens_per_s"], "-"),
                                "mfu_full": (rows["full"]["mfu"], "-")},
           {"matmul_peak_flops": peak, "steps_per_round": args.steps, "rounds": args.rounds, **rows})


if __name__ == "__main__":
    main()
