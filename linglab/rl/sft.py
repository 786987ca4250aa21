"""Supervised fine-tuning (the optional stage before RL), and what SFT and RL share: the prompt set, its evaluation
and the start checkpoint.

    linglab sft --ckpt runs/tiny/pretrain/final --out runs/tiny-sft --rl.sft_steps=100     # the embedded tasks
    linglab sft --ckpt CKPT --out runs/sft --data chat.jsonl --rl.sft_steps=200            # your own file (SPEC §10)
    linglab sft --out runs/sft --resume                                                   # after a kill
    linglab rl --ckpt runs/tiny-sft ...            # RL from the SFT checkpoint
    linglab rl --ckpt ... --rl.sft_steps=100       # or the same stage inside an RL run, before its first step

SFT is cross-entropy on the assistant tokens only of worked solutions: each example's conversation plus its solution
as the assistant reply, rendered through the tokenizer's chat template (`chat.render_conversation`: the reply and the
end-of-turn marker that closes it, EOS for linglab's template), packed into rows of `rl.sft_seq_len` tokens. The
AdamW betas and weight decay are the RL run's (SPEC §5) at `rl.sft_lr`. The embedded default draws train-split
problems of `rl.tiers`; a file gives its rows that have a solution (GSM8K's answer text, MATH's solution, a chat
row's final assistant message). Both stages evaluate the policy on the same held-out examples (`evaluate_policy`:
greedy accuracy, pass@k and ApexEval per subset, SPEC §6).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from linglab import checkpoint, evals
from linglab.chat import render_conversation, render_prompt
from linglab.config import Config, RLConfig
from linglab.data import DataLoader, PackedDataset
from linglab.datasets import Example, PromptSet, embedded_prompt_set, example_from_problem, load_prompt_set, read_examples
from linglab.errors import LinglabError
from linglab.evals import EMBEDDED_VARIANTS, PromptVariant, first_per_subset, policy_eval, read_variants, template_variants
from linglab.model import LingForCausalLM
from linglab.run import (
    TOKENIZER_NAME,
    RunDir,
    build_adamw,
    copy_model_files,
    refuse_pretraining_only_keys,
    releases_locks,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from linglab.tasks import CORE_TIERS, generate_problems
from linglab.tokenizer import Tokenizer, load_tokenizer
from linglab.verify import default_verifier

EVAL_TIERS = CORE_TIERS  # evaluated before and after, whatever rl.tiers trains on, so regressions show too


def eval_tiers(tiers: list[int]) -> list[int]:
    """The embedded tiers a run evaluates: the core tiers, plus any opt-in tier (`long`) it trains on."""
    return sorted(set(EVAL_TIERS) | set(tiers))
STATE_NAME = "sft_state.pt"
START_RECORD = "sft_start.json"  # where a resumed SFT run finds its start checkpoint


# ---------------------------------------------------------------- the prompt set, the start checkpoint, the evaluation


def load_prompts(cfg: RLConfig) -> PromptSet:
    """The prompt set of an RL or SFT run (SPEC §10): `rl.data` with its held-out part (`rl.eval_data`, or a stable-hash
    split of `rl.heldout_percent`), or the embedded tiers: `rl.train_problems` train-split problems of `rl.tiers`
    and `rl.eval_problems` held-out problems of each of `eval_tiers(rl.tiers)`."""
    if cfg.data:
        return load_prompt_set(cfg.data, cfg.eval_data or None, cfg.data_format, cfg.fields(), cfg.skip_bad_rows,
                               cfg.heldout_percent)
    train = embedded_prompt_set(cfg.tiers, cfg.seed, cfg.train_problems, 0).train
    if not cfg.eval_data:
        return PromptSet(train, embedded_prompt_set(eval_tiers(cfg.tiers), cfg.seed, 0, cfg.eval_problems).heldout,
                         "embedded", [])
    heldout, _, skipped = read_examples(cfg.eval_data, cfg.data_format, cfg.fields(), cfg.skip_bad_rows)
    return PromptSet(train, heldout, "embedded", [cfg.eval_data], len(skipped), skipped[:5])


def verifier_kind(cfg: RLConfig, prompts: PromptSet) -> str:
    """`rl.verifier`, with "auto" resolved from the prompt set's shape (math for MATH rows, numeric otherwise)."""
    return default_verifier(prompts.format) if cfg.verifier == "auto" else cfg.verifier


def eval_variants(cfg, prompts: PromptSet) -> tuple[PromptVariant, ...]:
    """ApexEval's prompt variants: a variants file (`variants`), the embedded tasks' rewordings, or the chat template
    with and without a system prompt in both modes (`evals.template_variants`)."""
    if cfg.variants:
        return read_variants(cfg.variants)
    return EMBEDDED_VARIANTS if prompts.format == "embedded" else template_variants(cfg.mode, cfg.system_prompt)


def check_prompt_lengths(examples: list[Example], tokenizer: Tokenizer, cfg: RLConfig, max_positions: int,
                         command: str) -> None:
    """One line naming the first example whose rendered prompt leaves no room for `rl.max_new_tokens` tokens."""
    texts = [render_prompt(tokenizer, e.chat(), cfg.mode, cfg.system_prompt) for e in examples]
    evals.check_prompt_lengths(examples, texts, tokenizer, cfg.max_new_tokens, max_positions, command,
                               "rl.max_new_tokens")


def read_inputs(cfg: RLConfig, ckpt: str | Path | None) -> list[str | Path]:
    """What an RL or SFT run reads from outside its --out: the start checkpoint and the prompt and variants files
    (`RunDir.check` keeps --out from being, holding or lying inside any of them: --overwrite would delete it)."""
    return [p for p in (ckpt, cfg.data, cfg.eval_data, cfg.variants) if p]


def check_start_checkpoint(ckpt: str | Path, command: str) -> None:
    """A one-line error, before anything is written, unless `ckpt` is an HF checkpoint with a tokenizer.json."""
    checkpoint.load_config_json(ckpt)
    if not (Path(ckpt) / TOKENIZER_NAME).is_file():
        raise LinglabError(f"{command}: {ckpt} has no tokenizer.json (RL and SFT decode and verify text)")


def load_start(source: Path, device: torch.device, command: str) -> tuple[LingForCausalLM, Tokenizer]:
    """The policy and its tokenizer from an HF checkpoint directory, on `device`."""
    model = checkpoint.from_pretrained(source, device=device)
    tokenizer = load_tokenizer(source)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise LinglabError(f"{command}: {source} has a tokenizer of {tokenizer.vocab_size} tokens for a model of "
                           f"vocab_size {model.cfg.vocab_size}")
    return model, tokenizer


def evaluate_policy(model: LingForCausalLM, tokenizer: Tokenizer, cfg: RLConfig, prompts: PromptSet, stage: str,
                    step: int) -> dict:
    """An eval row: greedy accuracy, pass@k and ApexEval per subset (SPEC §6) of the first `rl.eval_problems`
    held-out examples of each subset, labelled with its stage. For the embedded tiers these are the held-out problems
    of `linglab train` at data.seed = rl.seed."""
    result = policy_eval(model, tokenizer, first_per_subset(prompts.heldout, cfg.eval_problems), cfg.eval_samples,
                         cfg.eval_ks, verifier_kind(cfg, prompts), eval_variants(cfg, prompts), cfg.temperature,
                         cfg.seed, cfg.max_new_tokens)
    subsets = result["subsets"]
    return {"kind": "eval", "step": step, "stage": stage, "tiers": subsets,
            "accuracy": {t: v["greedy_accuracy"] for t, v in subsets.items()},
            "verifier_errors": result["verifier_errors"], "verifier_timeouts": result["verifier_timeouts"]}


# ---------------------------------------------------------------- the stage


def sft_examples(cfg: RLConfig, prompts: PromptSet) -> list[Example]:
    """What SFT trains on: the train rows of `rl.data` that have a worked solution, or (embedded) train-split problems
    of `rl.tiers` drawn apart from the RL prompts (seed + 10), enough for `rl.sft_steps` batches."""
    if prompts.format == "embedded":
        problems = generate_problems(cfg.sft_steps * cfg.sft_batch_size * 4, cfg.tiers, seed=cfg.seed + 10, split="train")
        return [example_from_problem(p) for p in problems]
    examples = [e for e in prompts.train if e.solution]
    if not examples:
        raise LinglabError(f"sft: no train row of {cfg.data} has a worked solution to train on (GSM8K `answer`, MATH "
                           "`solution`, a final assistant message, or a field named by rl.solution_field)")
    return examples


def sft_dataset(examples: list[Example], tokenizer: Tokenizer, cfg: RLConfig) -> PackedDataset:
    """Each example's conversation with its solution as the assistant reply, rendered through the chat template and
    packed; the loss covers the assistant pieces only."""
    conversations = [render_conversation(tokenizer, [*e.chat(), {"role": "assistant", "content": e.solution}],
                                         cfg.mode, cfg.system_prompt) for e in examples]
    data = PackedDataset.from_conversations(conversations, tokenizer, cfg.sft_seq_len)
    if len(data) < cfg.sft_batch_size:
        raise LinglabError(f"sft: the solutions pack into {len(data)} rows of {cfg.sft_seq_len} tokens, fewer than "
                           f"rl.sft_batch_size={cfg.sft_batch_size}; add rows or lower rl.sft_batch_size")
    return data


class SupervisedStage:
    """SFT's state: the packed data and its loader, AdamW, the step; a state dict for checkpoints."""

    def __init__(self, model: LingForCausalLM, data: PackedDataset, cfg: RLConfig):
        self.model, self.cfg = model, cfg
        self.loader = DataLoader(data, batch_size=cfg.sft_batch_size, seed=cfg.seed)
        self.optimizer = build_adamw(model.parameters(), cfg.sft_lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
        self.step = 0

    def train_step(self) -> float:
        """One AdamW step on a batch of packed rows; the main head's loss on the assistant tokens."""
        self.model.train()
        inputs, targets, mask = (t.to(self.model.lm_head.weight.device) for t in self.loader.next_batch())
        out = self.model(inputs, targets=targets, loss_mask=mask)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return out.main_loss.item()

    def state_dict(self) -> dict:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "loader": self.loader.state_dict(),
                "rng": rng_state()}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.loader.load_state_dict(state["loader"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise checkpoint.CheckpointError(f"unreadable SFT state ({e})") from None
        self.step = state["step"]
        set_rng_state(state["rng"])


def sft(model: LingForCausalLM, tokenizer: Tokenizer, cfg: RLConfig, examples: list[Example], log_row=None) -> None:
    """The supervised warm-up inside an RL run (`rl.sft_steps` before the first RL step), no checkpoints."""
    stage = SupervisedStage(model, sft_dataset(examples, tokenizer, cfg), cfg)
    while stage.step < cfg.sft_steps:
        loss = stage.train_step()
        if log_row is not None:
            log_row({"kind": "sft", "step": 0, "sft_step": stage.step, "loss": loss})


@releases_locks
def run_sft(cfg: Config, ckpt: str | Path | None, out: str | Path, resume: bool = False, overwrite: bool = False,
            console=None, command: str = "") -> dict:
    """`linglab sft`: the supervised stage alone (`rl.sft_*` keys, `rl.data`), resumable, written as an HF checkpoint
    RL can start from.

    <out> holds config.json, model.safetensors and the tokenizer files at the end (so `linglab rl --ckpt <out>`
    works), plus config.toml, sft_start.json (the start checkpoint), metrics.jsonl (one `sft` row per step, `eval`
    rows before and after), checkpoints/step_NNNNNN/ every `rl.ckpt_every` steps, sft_eval.json and summary.json.
    """
    from rich.console import Console

    from linglab.rl.report import write_sft_report

    rl = cfg.rl
    console = console or Console()
    if rl.sft_steps < 1:
        raise LinglabError("sft: rl.sft_steps is 0; give the number of steps, e.g. --rl.sft_steps=100")
    run = RunDir(out, "sft", STATE_NAME)
    # Everything is read and checked before --out is touched: the start checkpoint, the device, the data, --out.
    if not resume:
        if ckpt is None:
            raise LinglabError("sft: --ckpt is required to start a run")
        check_start_checkpoint(ckpt, "sft")
    device = resolve_device(cfg.train.device, "sft")
    refuse_pretraining_only_keys(cfg.train, "sft")
    run.check(resume, overwrite, inputs=[] if resume else read_inputs(rl, ckpt))
    run.lock()
    changes = {}
    if resume:
        changes = run.resume_changes(cfg)
        record = run.path / START_RECORD
        if not record.is_file():
            raise LinglabError(f"sft: {run.path} has no {START_RECORD}; start over with --ckpt and --overwrite")
        ckpt = json.loads(record.read_text())["ckpt"]
        if not run.checkpoints():
            check_start_checkpoint(ckpt, "sft")
    source = Path(ckpt) if Path(ckpt, checkpoint.CONFIG_NAME).is_file() else run.checkpoints()[-1]
    model, tokenizer = load_start(source, device, "sft")
    prompts = load_prompts(rl)
    eval_variants(rl, prompts)
    examples = sft_examples(rl, prompts)
    if prompts.skipped:
        console.print(f"[yellow]skipped {prompts.skipped} malformed row(s) of {rl.data}, e.g. {prompts.skipped_reasons[0]}")
    check_prompt_lengths(first_per_subset(prompts.heldout, rl.eval_problems), tokenizer, rl,
                         model.cfg.max_position_embeddings, "sft")
    seed_everything(rl.seed)
    stage = SupervisedStage(model, sft_dataset(examples, tokenizer, rl), rl)

    run.begin(resume, overwrite)
    try:
        if resume:
            def load(path: Path) -> None:
                checkpoint.load_state_into(model, checkpoint.load_hf_tensors(path), str(path))
                stage.load_state_dict(run.load_state(path))

            resumed_from = run.load_newest(load, console.print)
            run.truncate_metrics(stage.step)
            run.write_config(cfg)
            run.append_metrics({"kind": "resume", "step": stage.step, "from": str(resumed_from),
                                "changes": {k: list(v) for k, v in changes.items()}, "command": command})
        else:
            run.write_config(cfg)
            run.write_json(START_RECORD, {"ckpt": str(Path(ckpt).resolve())})
            run.metrics_path.write_text("")
    except BaseException:
        run.rollback()
        raise
    run.commit()

    stages = {row["stage"]: row for row in run.read_metrics() if row.get("kind") == "eval"}
    if rl.eval_problems and "before" not in stages:
        stages["before"] = evaluate_policy(model, tokenizer, rl, prompts, "before", 0)
        run.append_metrics(stages["before"])
    what = f"{len(examples)} solutions of {rl.data}" if rl.data else f"worked solutions of tiers {rl.tiers}"
    console.print(f"SFT: {rl.sft_steps} steps on {what} -> {run.path}"
                  + (f" (resumed at step {stage.step})" if resume else ""))
    start = time.perf_counter()
    while stage.step < rl.sft_steps:
        loss = stage.train_step()
        run.append_metrics({"kind": "sft", "step": stage.step, "sft_step": stage.step, "loss": loss})
        if stage.step % rl.ckpt_every == 0 or stage.step == rl.sft_steps:
            run.save_checkpoint(stage.step, model, tokenizer, stage.state_dict(), rl.keep_last)
            console.print(f"step {stage.step}/{rl.sft_steps} loss {loss:.4f}")
    elapsed = time.perf_counter() - start
    copy_model_files(run.checkpoints()[-1], run.path)  # at the top level: `linglab rl --ckpt <out>`
    if rl.eval_problems:
        stages["after"] = evaluate_policy(model, tokenizer, rl, prompts, "after", rl.sft_steps)
        run.append_metrics(stages["after"])
        run.write_json("sft_eval.json", {k: {"step": v["step"], "tiers": v["tiers"]} for k, v in stages.items()})
        for tier in stages["after"]["accuracy"]:
            console.print(f"held-out {tier:6s} greedy {stages['before']['accuracy'][tier]:6.1%} -> "
                          f"{stages['after']['accuracy'][tier]:6.1%}")
    summary = {"sft_steps": rl.sft_steps, "start_checkpoint": str(ckpt), "data": rl.data or "embedded tiers",
               "examples": len(examples), "skipped_rows": prompts.skipped, "rows": len(stage.loader.dataset),
               "wall_time_s": elapsed, "command": command}
    run.write_json("summary.json", summary)
    console.print(f"report: {write_sft_report(run.path)}")
    console.print(f"SFT checkpoint: {run.path} (linglab rl --ckpt {run.path} ...)")
    return summary
