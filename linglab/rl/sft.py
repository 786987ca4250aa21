"""Supervised fine-tuning (the optional stage before RL), and the start checkpoint SFT and RL share.

    linglab sft --ckpt runs/tiny/pretrain/final --out runs/tiny-sft --rl.sft_steps=100
    linglab rl --ckpt runs/tiny-sft ...            # RL from the SFT checkpoint
    linglab rl --ckpt ... --rl.sft_steps=100       # or the same stage inside an RL run, before its first step

SFT is cross-entropy on the worked solutions (answer tokens only) of train-split problems, with the RL run's
AdamW betas and weight decay (SPEC §5) at `rl.sft_lr`. Both stages evaluate the policy on the same held-out
problems (`evaluate_policy`: greedy accuracy, pass@k and ApexEval per tier, SPEC §6).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from linglab import checkpoint
from linglab.config import Config, RLConfig
from linglab.data import DataLoader, PackedDataset
from linglab.errors import LinglabError
from linglab.evals import policy_eval
from linglab.model import LingForCausalLM
from linglab.run import TOKENIZER_NAME, RunDir, build_adamw, releases_locks, resolve_device, seed_everything
from linglab.tasks import format_document, generate_problems, heldout_problems
from linglab.tokenizer import Tokenizer, load_tokenizer

EVAL_TIERS = (0, 1, 2)  # evaluated before and after, whatever rl.tiers trains on, so regressions show too


# ---------------------------------------------------------------- the start checkpoint and its evaluation


def check_start_checkpoint(ckpt: str | Path, command: str) -> None:
    """A one-line error, before anything is written, unless `ckpt` is an HF checkpoint with a tokenizer.json."""
    checkpoint.load_config_json(ckpt)
    if not (Path(ckpt) / TOKENIZER_NAME).is_file():
        raise LinglabError(f"{command}: {ckpt} has no tokenizer.json (RL and SFT decode and verify text)")


def load_start(source: Path, device: torch.device, command: str) -> tuple[LingForCausalLM, Tokenizer]:
    """The policy and its tokenizer from an HF checkpoint directory, on `device`."""
    model = checkpoint.from_pretrained(source, device=device)
    tokenizer = load_tokenizer(source / TOKENIZER_NAME)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise LinglabError(f"{command}: {source} has a tokenizer of {tokenizer.vocab_size} tokens for a model of "
                           f"vocab_size {model.cfg.vocab_size}")
    return model, tokenizer


def evaluate_policy(model: LingForCausalLM, tokenizer: Tokenizer, cfg: RLConfig, stage: str, step: int) -> dict:
    """An eval row: greedy accuracy, pass@k and ApexEval per tier (SPEC §6), labelled with its stage. The problems
    are `rl.eval_problems` held-out ones per tier, those of `linglab train` at data.seed = rl.seed."""
    problems = [p for tier in heldout_problems(cfg.eval_problems, EVAL_TIERS, cfg.seed).values() for p in tier]
    tiers = policy_eval(model, tokenizer, problems, cfg.eval_samples, cfg.eval_ks, temperature=cfg.temperature,
                        seed=cfg.seed)
    return {"kind": "eval", "step": step, "stage": stage, "tiers": tiers,
            "accuracy": {t: v["greedy_accuracy"] for t, v in tiers.items()}}


# ---------------------------------------------------------------- the stage


def sft(model: LingForCausalLM, tokenizer: Tokenizer, cfg: RLConfig, log_row=None) -> None:
    """Supervised warm-up: cross-entropy on the worked solutions (answer tokens only) of train-split problems."""
    # A problem stream apart from the RL prompts (seed) and the held-out sets (seed + 1 + tier).
    problems = generate_problems(cfg.sft_steps * cfg.sft_batch_size * 4, cfg.tiers, seed=cfg.seed + 10, split="train")
    data = PackedDataset.from_pairs([format_document(p) for p in problems], tokenizer, cfg.sft_seq_len)
    loader = DataLoader(data, batch_size=cfg.sft_batch_size, seed=cfg.seed)
    optimizer = build_adamw(model.parameters(), cfg.sft_lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    model.train()
    for step in range(1, cfg.sft_steps + 1):
        inputs, targets, mask = (t.to(model.lm_head.weight.device) for t in loader.next_batch())
        out = model(inputs, targets=targets, loss_mask=mask)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if log_row is not None:
            log_row({"kind": "sft", "step": 0, "sft_step": step, "loss": out.main_loss.item()})


@releases_locks
def run_sft(cfg: Config, ckpt: str | Path, out: str | Path, overwrite: bool = False, console=None,
            command: str = "") -> dict:
    """`linglab sft`: the supervised stage alone (`rl.sft_*` keys), written as an HF checkpoint RL can start from.

    <out> holds config.json, model.safetensors and tokenizer.json (so `linglab rl --ckpt <out>` works), plus
    config.toml, metrics.jsonl (one `sft` row per step, `eval` rows before and after), sft_eval.json and
    summary.json.
    """
    from rich.console import Console

    rl = cfg.rl
    console = console or Console()
    if rl.sft_steps < 1:
        raise LinglabError("sft: rl.sft_steps is 0; give the number of steps, e.g. --rl.sft_steps=100")
    check_start_checkpoint(ckpt, "sft")
    device = resolve_device(cfg.train.device, "sft")
    run = RunDir(out, "sft")
    run.check(resume=False, overwrite=overwrite, inputs=[ckpt])
    run.lock()
    model, tokenizer = load_start(Path(ckpt), device, "sft")  # read and checked before --out is touched
    run.begin(resume=False, overwrite=overwrite)
    try:
        run.write_config(cfg)
        run.metrics_path.write_text("")
    except BaseException:
        run.rollback()
        raise
    run.commit()
    seed_everything(rl.seed)

    stages = {}
    if rl.eval_problems:
        stages["before"] = evaluate_policy(model, tokenizer, rl, "before", 0)
        run.append_metrics(stages["before"])
    console.print(f"SFT: {rl.sft_steps} steps on worked solutions of tiers {rl.tiers} -> {run.path}")
    start = time.perf_counter()
    sft(model, tokenizer, rl, run.append_metrics)
    elapsed = time.perf_counter() - start
    checkpoint.write_model_files(model, run.path)
    tokenizer.save(run.path / TOKENIZER_NAME)
    if rl.eval_problems:
        stages["after"] = evaluate_policy(model, tokenizer, rl, "after", rl.sft_steps)
        run.append_metrics(stages["after"])
        run.write_json("sft_eval.json", {k: {"step": v["step"], "tiers": v["tiers"]} for k, v in stages.items()})
        for tier in stages["after"]["accuracy"]:
            console.print(f"held-out {tier:6s} greedy {stages['before']['accuracy'][tier]:6.1%} -> "
                          f"{stages['after']['accuracy'][tier]:6.1%}")
    summary = {"sft_steps": rl.sft_steps, "start_checkpoint": str(ckpt), "wall_time_s": elapsed, "command": command}
    run.write_json("summary.json", summary)
    console.print(f"SFT checkpoint: {run.path} (linglab rl --ckpt {run.path} ...)")
    return summary
