"""Evaluation: the pretraining run's held-out loss and exact match per tier, and the policy evaluation of any prompt
set (greedy accuracy, unbiased pass@k and ApexEval, SPEC §6) that SFT, RL and `linglab eval --data` use.

    linglab eval --ckpt runs/tiny/pretrain/final                     # held-out loss + greedy exact match per tier
    linglab eval --ckpt A --ckpt B --data test.jsonl --verifier math  # greedy, pass@k, ApexEval per checkpoint
    policy_eval(model, tok, examples, n=8, ks=[1, 4, 8], kind="numeric", variants=EMBEDDED_VARIANTS)

Every answer is checked by `linglab.verify` (the RL reward's verifier too), which compares values, not strings
(SPEC §6): a pretraining run's exact match is the numeric verifier on the `answer:` line of a greedy completion;
the policy evaluation runs `verify_batch` with the prompt set's verifier and renders prompts through the
tokenizer's chat template (`linglab.chat.render_prompt`). Held-out problems are disjoint from training by
construction (`tasks.is_heldout`, `datasets.split_heldout`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from linglab.chat import MODES, render_prompt
from linglab.data import PackedDataset
from linglab.datasets import Example
from linglab.errors import LinglabError
from linglab.generate import generate, generate_text
from linglab.model import LingForCausalLM
from linglab.passk import pass_at_k_batch, pass_at_k_by_variant
from linglab.tasks import TIERS, Problem
from linglab.tokenizer import Tokenizer
from linglab.verify import verify, verify_batch

MAX_NEW_TOKENS = 64  # the longest worked solution of the embedded tiers is ~35 tokens


@torch.no_grad()
def heldout_loss(model: LingForCausalLM, dataset: PackedDataset, batch_size: int = 64) -> float:
    """Mean masked cross-entropy of the main head over a packed held-out set."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    device = next(model.parameters()).device
    try:
        for start in range(0, len(dataset), batch_size):
            rows = dataset.tokens[start:start + batch_size].long().to(device)
            mask = dataset.loss_mask[start:start + batch_size, 1:].float().to(device)
            out = model(rows[:, :-1], targets=rows[:, 1:], loss_mask=mask)
            n = mask.sum().item()
            total += out.main_loss.item() * n
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1.0)


def tier_accuracy(model: LingForCausalLM, tokenizer, problems: list[Problem]) -> float:
    """Greedy exact-match accuracy over problems."""
    completions = generate_text(model, tokenizer, [p.prompt for p in problems], max_new_tokens=MAX_NEW_TOKENS,
                                temperature=0.0)
    return sum(verify(c, p.answer, "numeric") for c, p in zip(completions, problems)) / max(len(problems), 1)


def evaluate_run(model: LingForCausalLM, data, step: int) -> dict:
    """An eval row for metrics.jsonl: held-out loss (all tiers together and each alone) and greedy exact match per
    tier, of a `RunData` (the embedded corpus; user text has no held-out problems)."""
    row = {"kind": "eval", "step": step, "heldout_loss": None, "accuracy": {}, "heldout_loss_by_tier": {}}
    if data.heldout is not None:
        row["heldout_loss"] = heldout_loss(model, data.heldout)
    for tier, problems in data.heldout_problems.items():
        name = TIERS[tier].name
        row["accuracy"][name] = tier_accuracy(model, data.tokenizer, problems)
        if tier in data.heldout_by_tier:
            row["heldout_loss_by_tier"][name] = heldout_loss(model, data.heldout_by_tier[tier])
    return row


def sample_completions(model: LingForCausalLM, data, n: int) -> list[dict]:
    """Up to n greedy completions of held-out prompts, spread over tiers, for the run report."""
    # Round-robin over tiers: the first problem of each tier, then the second of each, ...
    interleaved = [p for group in zip(*data.heldout_problems.values()) for p in group]
    chosen = interleaved[:n]
    if not chosen:
        return []
    completions = generate_text(model, data.tokenizer, [p.prompt for p in chosen], max_new_tokens=MAX_NEW_TOKENS,
                                temperature=0.0)
    return [{"prompt": p.prompt, "completion": c, "answer": p.answer, "correct": verify(c, p.answer, "numeric"),
             "tier": TIERS[p.tier].name} for p, c in zip(chosen, completions)]


_EQUATION_PROMPT = re.compile(r"(.+)=\?\n")


def _question_prompt(prompt: str) -> str:
    match = _EQUATION_PROMPT.fullmatch(prompt)
    return f"What is {match.group(1)}?\n" if match else prompt


def _bare_prompt(prompt: str) -> str:
    match = _EQUATION_PROMPT.fullmatch(prompt)
    return f"{match.group(1)}=\n" if match else prompt


# ---------------------------------------------------------------- policy evaluation of a prompt set (SPEC §6)


@dataclass(frozen=True)
class PromptVariant:
    """One way of putting every question of a set to the model, for ApexEval (SPEC §6): a rewrite of the question
    (the last user message), the chat mode and a system prompt, rendered through the tokenizer's chat template."""

    name: str
    rewrite: Callable[[str], str] | None = None
    mode: str = "instant"
    system_prompt: str = ""

    def prompt(self, tokenizer: Tokenizer, example: Example) -> str:
        """The text the model continues from: the example's conversation, rewritten, through the template."""
        messages = example.chat()
        if self.rewrite is not None:
            last = max(i for i, m in enumerate(messages) if m["role"] == "user")
            messages[last] = {**messages[last], "content": self.rewrite(messages[last]["content"])}
        return render_prompt(tokenizer, messages, self.mode, self.system_prompt)


# The embedded tasks' variants: the training format "47+58=?", the question "What is 47+58?" and the bare "47+58=".
# Word problems have one wording only, so every variant leaves them as they are.
EMBEDDED_VARIANTS = (PromptVariant("plain"), PromptVariant("question", _question_prompt),
                     PromptVariant("bare", _bare_prompt))
DEFAULT_SYSTEM_PROMPT = "Solve the problem step by step, then give the final answer."


def template_variants(mode: str = "instant", system_prompt: str = "") -> tuple[PromptVariant, ...]:
    """ApexEval's variants of a prompt file: the chat template with and without a system prompt, in instant and
    thinking mode. The first is the run's own (`mode`, `system_prompt`): greedy accuracy and pass@k use it.
    Without a `system_prompt`, the "+system" variants use DEFAULT_SYSTEM_PROMPT."""
    system = system_prompt or DEFAULT_SYSTEM_PROMPT
    own = PromptVariant(mode + ("+system" if system_prompt else ""), mode=mode, system_prompt=system_prompt)
    others = [PromptVariant(m + suffix, mode=m, system_prompt=sp)
              for m in (mode, *(x for x in MODES if x != mode)) for suffix, sp in (("", ""), ("+system", system))]
    return (own, *(v for v in others if v.name != own.name))


def read_variants(path: str | Path) -> tuple[PromptVariant, ...]:
    """Prompt variants from a JSONL file, one object per line: {"name": ..., "template": "... {prompt} ...",
    "system_prompt": ..., "mode": "instant" | "thinking"} (all but the name optional; the first variant is the one
    greedy accuracy and pass@k use). One line naming the file, line and field if one is malformed."""
    path = Path(path)
    if not path.is_file():
        raise LinglabError(f"variants: file not found: {path}")
    variants: list[PromptVariant] = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="strict").splitlines(), 1):
        if not line.strip():
            continue
        where = f"variants: {path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LinglabError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise LinglabError(f"{where}: expected an object, got {type(row).__name__}")
        unknown = set(row) - {"name", "template", "system_prompt", "mode"}
        if unknown:
            raise LinglabError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} "
                               "(known: name, template, system_prompt, mode)")
        for key in row:
            if not isinstance(row[key], str):
                raise LinglabError(f"{where}: {key}: expected a string, got {row[key]!r}")
        if not row.get("name"):
            raise LinglabError(f"{where}: name: missing")
        template = row.get("template", "{prompt}")
        if "{prompt}" not in template:
            raise LinglabError(f"{where}: template: must contain {{prompt}}")
        if row.get("mode", "instant") not in MODES:
            raise LinglabError(f"{where}: mode: must be one of {', '.join(MODES)}, got {row['mode']!r}")
        if row["name"] in {v.name for v in variants}:
            raise LinglabError(f"{where}: name: {row['name']!r} given twice")
        rewrite = None if template == "{prompt}" else (lambda p, t=template: t.replace("{prompt}", p))
        variants.append(PromptVariant(row["name"], rewrite, row.get("mode", "instant"), row.get("system_prompt", "")))
    if not variants:
        raise LinglabError(f"variants: {path} has no variants")
    return tuple(variants)


SAMPLE_ROWS = 256  # sequences per generate call: memory stays bounded on any set size


def _completions(model: LingForCausalLM, tokenizer: Tokenizer, prompts: Sequence[str], n: int, temperature: float,
                 seed: int, max_new_tokens: int) -> list[str]:
    """n completions of each prompt, prompt-major ([p0 x n, p1 x n, ...]); greedy when temperature = 0. Prompts go
    to `generate` in chunks of SAMPLE_ROWS rows; chunk c samples from seed + c."""
    per_call = max(1, SAMPLE_ROWS // n)
    texts = []
    for c, start in enumerate(range(0, len(prompts), per_call)):
        ids = [row for row in tokenizer.encode_batch(list(prompts[start:start + per_call])) for _ in range(n)]
        result = generate(model, ids, max_new_tokens, tokenizer.stop_ids, temperature=temperature, seed=seed + c)
        texts += [tokenizer.decode(t) for t in result.tokens]
    return texts


def policy_eval(model: LingForCausalLM, tokenizer: Tokenizer, examples: Sequence[Example], n: int, ks: Sequence[int],
                kind: str, variants: Sequence[PromptVariant] = EMBEDDED_VARIANTS, temperature: float = 1.0,
                seed: int = 0, max_new_tokens: int = MAX_NEW_TOKENS, log=None) -> dict:
    """Greedy accuracy, unbiased pass@k and ApexEval per subset of `examples` (SPEC §6), answers checked by
    `verify.verify_batch(kind)`.

    Greedy accuracy and pass@k use the first variant; ApexEval is the best variant's mean pass@k at the largest k
    (a variant rendering the same prompts as an earlier one reuses its samples; one the tokenizer cannot render, such
    as thinking mode without a chat template, is left out and named in "skipped_variants"). Returns {"subsets": {name:
    {n_problems, greedy_accuracy, pass@k..., apex: {k, apex, best_variant, variants}}}, "verifier_errors",
    "verifier_timeouts", "skipped_variants"}.
    """
    subsets: dict[str, list[Example]] = {}
    for example in examples:
        subsets.setdefault(example.subset, []).append(example)
    problems = {"verifier_errors": 0, "verifier_timeouts": 0}
    skipped: dict[str, str] = {}

    def score(texts: list[str], answers: list[str]) -> list[bool]:
        ok, counts = verify_batch(texts, answers, kind)
        for key in problems:
            problems[key] += counts.get(key, 0)
        return ok

    out = {}
    for name, group in subsets.items():
        answers = [e.answer for e in group]
        counts: dict[str, list[int]] = {}
        rendered: dict[tuple[str, ...], str] = {}
        first: tuple[str, ...] = ()  # the first variant's prompts, which greedy accuracy reuses
        for variant in variants:
            try:
                prompts = tuple(variant.prompt(tokenizer, e) for e in group)
            except LinglabError as e:  # e.g. thinking mode under a tokenizer without a chat template
                if variant is variants[0]:
                    raise
                skipped[variant.name] = str(e)
                continue
            if prompts in rendered:  # e.g. "thinking" under a template without a thinking switch
                counts[variant.name] = counts[rendered[prompts]]
                continue
            rendered[prompts] = variant.name
            first = first if variant is not variants[0] else prompts
            if log is not None:
                log(f"  {name}: variant {variant.name}, {len(group)} prompts x {n} samples")
            ok = score(_completions(model, tokenizer, prompts, n, temperature, seed, max_new_tokens),
                       [a for a in answers for _ in range(n)])
            counts[variant.name] = [sum(ok[i * n:(i + 1) * n]) for i in range(len(group))]
        greedy = score(_completions(model, tokenizer, first, 1, 0.0, seed, max_new_tokens), answers)
        scores = pass_at_k_by_variant(counts, n, max(ks))
        best = max(scores, key=scores.get)
        out[name] = {"n_problems": len(group), "greedy_accuracy": sum(greedy) / len(group),
                     **{f"pass@{k}": float(pass_at_k_batch(n, counts[variants[0].name], k).mean()) for k in ks},
                     "apex": {"k": max(ks), "apex": scores[best], "best_variant": best, "variants": scores}}
    return {"subsets": out, **problems, "skipped_variants": skipped}


def check_prompt_lengths(examples: Sequence[Example], texts: Sequence[str], tokenizer: Tokenizer, max_new_tokens: int,
                         max_positions: int, command: str, key: str) -> None:
    """One line naming the first example whose rendered prompt (`texts`) leaves no room for `max_new_tokens` (the
    config `key` that sets it) within the model's context."""
    for example, ids in zip(examples, tokenizer.encode_batch(list(texts)), strict=True):
        if len(ids) + max_new_tokens > max_positions:
            raise LinglabError(f"{command}: {example.source or 'a prompt'}: the prompt has {len(ids)} tokens; with "
                               f"{key}={max_new_tokens} it exceeds the model's max_position_embeddings ({max_positions})")


def first_per_subset(examples: Sequence[Example], n: int) -> list[Example]:
    """The first `n` examples of each subset, in their order."""
    taken: dict[str, int] = {}
    out = []
    for example in examples:
        if taken.get(example.subset, 0) < n:
            taken[example.subset] = taken.get(example.subset, 0) + 1
            out.append(example)
    return out


def overall(subsets: Mapping[str, dict]) -> dict:
    """The per-subset results of `policy_eval` pooled over all problems: means weighted by n_problems, ApexEval the
    best variant of the pooled means (what `policy_eval` of the whole set as one subset gives)."""
    total = sum(s["n_problems"] for s in subsets.values())

    def pooled(get) -> float:
        return sum(get(s) * s["n_problems"] for s in subsets.values()) / total

    first = next(iter(subsets.values()))
    scores = {v: pooled(lambda s, v=v: s["apex"]["variants"][v]) for v in first["apex"]["variants"]}
    best = max(scores, key=scores.get)
    return {"n_problems": total, **{k: pooled(lambda s, k=k: s[k]) for k in first if k.startswith("pass@")},
            "greedy_accuracy": pooled(lambda s: s["greedy_accuracy"]),
            "apex": {"k": first["apex"]["k"], "apex": scores[best], "best_variant": best, "variants": scores}}


# ---------------------------------------------------------------- `linglab eval --data`: checkpoints compared


def checkpoint_labels(ckpts: Sequence[str | Path]) -> list[str]:
    """Short unique names for checkpoint directories: the last path component, or more of the path where two share it."""
    parts = [Path(c).resolve().parts for c in ckpts]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["-".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}-{Path(c).name}" for i, c in enumerate(ckpts)]  # the same directory given twice


def remove_evaluation_files(out: Path) -> list[Path]:
    """The JSON files an earlier `evaluate_checkpoints` wrote into `out` (a checkpoint record or a summary, told by
    their keys), removed; anything else in the directory stays."""
    removed = []
    for path in sorted(out.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "settings" in record and ("ckpt" in record or "checkpoints" in record):
            path.unlink()
            removed.append(path)
    return removed


def evaluate_checkpoints(cfg, ckpts: Sequence[str | Path], out: str | Path | None = None, overwrite: bool = False,
                         resume: bool = False, command: str = "", console=None) -> dict:
    """Greedy accuracy, pass@k and ApexEval (SPEC §6) of each checkpoint on the prompt file `cfg.data` (an EvalConfig),
    one table each, and which checkpoint has the highest ApexEval score (the one Ling would pick for RL).

    With `out`: <out>/<label>.json per checkpoint as it finishes and <out>/summary.json; `resume` keeps the files of
    checkpoints already evaluated with the same settings; `overwrite` removes an earlier evaluation's files (and only
    those) when the first new result is written, so no stale checkpoint's record outlives it. Every input
    (checkpoints, data, variants, --out, each checkpoint's prompt lengths) is checked before the first model loads.
    """
    from rich.console import Console
    from rich.table import Table

    from linglab.checkpoint import from_pretrained, load_config_json
    from linglab.datasets import read_examples
    from linglab.run import check_output
    from linglab.tokenizer import load_tokenizer
    from linglab.verify import default_verifier

    console = console or Console()
    if not ckpts:
        raise LinglabError("eval: give at least one --ckpt")
    configs = [load_config_json(c) for c in ckpts]
    tokenizers = [load_tokenizer(c) for c in ckpts]
    examples, shape, skipped = read_examples(cfg.data, cfg.data_format, cfg.fields(), cfg.skip_bad_rows)
    if cfg.problems:
        examples = first_per_subset(examples, cfg.problems)
    variants = read_variants(cfg.variants) if cfg.variants else template_variants(cfg.mode, cfg.system_prompt)
    kind = default_verifier(shape) if cfg.verifier == "auto" else cfg.verifier
    out = Path(out) if out is not None else None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise LinglabError(f"eval: --out {out} is a file, expected a directory")
        check_output(out, overwrite or resume, "eval", inputs=[*ckpts, cfg.data, *([cfg.variants] if cfg.variants else [])])
    elif resume:
        raise LinglabError("eval: --resume needs the --out directory of the evaluation to continue")
    for model_cfg, tokenizer in zip(configs, tokenizers):
        check_prompt_lengths(examples, [variants[0].prompt(tokenizer, e) for e in examples], tokenizer,
                             cfg.max_new_tokens, model_cfg.max_position_embeddings, "eval", "eval.max_new_tokens")
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} malformed row(s) of {cfg.data}, e.g. {skipped[0]}")
    settings = {"data": str(cfg.data), "format": shape, "verifier": kind, "problems": len(examples),
                "samples": cfg.samples, "ks": list(cfg.ks), "temperature": cfg.temperature,
                "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "variants": [v.name for v in variants],
                "skipped_rows": len(skipped)}
    console.print(f"evaluating {len(ckpts)} checkpoint(s) on {len(examples)} questions of {cfg.data} ({shape}, "
                  f"verifier {kind}), {cfg.samples} samples x {len(variants)} prompt variants")

    results, cleared = {}, resume or not overwrite
    for label, ckpt, tokenizer in zip(checkpoint_labels(ckpts), ckpts, tokenizers):
        path = None if out is None else out / f"{label}.json"
        if resume and path is not None and path.is_file():
            previous = json.loads(path.read_text())
            if previous.get("settings") == settings and previous.get("ckpt") == str(ckpt):
                results[label] = previous
                console.print(f"{label}: kept {path} (evaluated before with the same settings)")
                continue
        model = from_pretrained(ckpt)
        console.print(f"{label}: {ckpt}")
        result = policy_eval(model, tokenizer, examples, cfg.samples, cfg.ks, kind, variants, cfg.temperature,
                             cfg.seed, cfg.max_new_tokens, log=console.print)
        record = {"ckpt": str(ckpt), "settings": settings, "subsets": result["subsets"],
                  "all": overall(result["subsets"]), "verifier_errors": result["verifier_errors"],
                  "verifier_timeouts": result["verifier_timeouts"], "skipped_variants": result["skipped_variants"],
                  "command": command}
        results[label] = record
        console.print(_result_table(f"{label} on {cfg.data}", record, cfg.ks, Table))
        if path is not None:
            out.mkdir(parents=True, exist_ok=True)  # not before: a checkpoint that fails its checks writes nothing
            if not cleared:
                remove_evaluation_files(out)
                cleared = True
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            tmp.replace(path)

    best = max(results, key=lambda label: results[label]["all"]["apex"]["apex"])
    summary = {"settings": settings, "best_apex": best, "command": command,
               "checkpoints": {label: {"ckpt": r["ckpt"], **{k: v for k, v in r["all"].items() if k != "apex"},
                                       "apex": r["all"]["apex"]["apex"],
                                       "apex_variant": r["all"]["apex"]["best_variant"]} for label, r in results.items()}}
    if len(results) > 1:
        table = Table(title=f"checkpoints on {cfg.data} (ApexEval = best pass@{max(cfg.ks)} over prompt variants)")
        for col in ("checkpoint", "greedy", *(f"pass@{k}" for k in cfg.ks), "ApexEval", "best variant"):
            table.add_column(col)
        for label, row in summary["checkpoints"].items():
            table.add_row(label + (" *" if label == best else ""), f"{row['greedy_accuracy']:.1%}",
                          *(f"{row[f'pass@{k}']:.1%}" for k in cfg.ks), f"{row['apex']:.1%}", row["apex_variant"])
        console.print(table)
    console.print(f"highest ApexEval: {best} ({results[best]['all']['apex']['apex']:.1%}, variant "
                  f"{results[best]['all']['apex']['best_variant']})")
    if out is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        console.print(f"wrote {out}/summary.json and one JSON per checkpoint")
    return summary


def _result_table(title: str, record: dict, ks: Sequence[int], table_type):
    table = table_type(title=title)
    for col in ("subset", "n", "greedy", *(f"pass@{k}" for k in ks), "ApexEval (variant)"):
        table.add_column(col)
    rows = list(record["subsets"].items())
    if len(rows) > 1:
        rows.append(("all", record["all"]))
    for name, r in rows:
        table.add_row(name, str(r["n_problems"]), f"{r['greedy_accuracy']:.1%}",
                      *(f"{r[f'pass@{k}']:.1%}" for k in ks), f"{r['apex']['apex']:.1%} ({r['apex']['best_variant']})")
    return table
