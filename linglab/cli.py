"""`linglab <subcommand>`: the one command-line entry point.

    linglab params --preset ling-mini-2.0           # total / active / non-embedding active parameters
    linglab params --preset ring-mini-linear-2.0    # ... of the Ring-linear hybrid (SPEC §8; tiny-linear on a CPU)
    linglab init --preset tiny --out ckpt/tiny       # a randomly initialised HF BailingMoeV2 checkpoint
    linglab check --preset tiny                      # build, print the parameter table, forward + backward
    linglab export --ckpt ckpt/tiny --out ckpt/tiny-fp8 --fp8   # the HF FP8 format (SPEC §1.6)
    linglab convert --to linear --ckpt runs/tiny/final --out ckpt/tiny-hybrid --layer-group-size 2   # SPEC §8
    linglab train --preset tiny-linear --init-from ckpt/tiny-hybrid --out runs/tiny-hybrid   # continue pretraining it
    linglab scaling sweep --out runs/scaling --dry-run  # scaling-law sweep, fit, suggest (SPEC §4; linglab.scaling)
    linglab rl --ckpt runs/tiny/pretrain/final --out runs/tiny-rl --rl.algo=lpo   # RL post-training (SPEC §5)
    linglab rl --ckpt CKPT --out runs/rl --data gsm8k.jsonl --rl.algo=lpo      # ... on your own prompt file (SPEC §10)
    torchrun --nproc_per_node 2 -m linglab rl --ckpt CKPT --out runs/rl-dp2      # colocated RL on 2 ranks (docs/rl.md)
    linglab sft --ckpt runs/tiny/pretrain/final --out runs/tiny-sft --rl.sft_steps=100   # optional SFT before RL
    linglab eval --ckpt A --ckpt B --data test.jsonl --verifier math --out runs/eval    # greedy, pass@k, ApexEval
    linglab pipeline --preset tiny --out runs/tiny --overwrite --rl-seeds 3   # make run: pretrain -> RL -> report
    linglab plan --preset ling-mini-2.0 --stages 8      # heterogeneous pipeline partition (SPEC §7)
    linglab tasks export --out tasks.jsonl              # the embedded tasks as a prompt file (SPEC §10)

Config overrides go after the subcommand as `--section.key=value` (e.g. `--model.hidden_size=256`).
User errors (bad key, missing file, wrong shape) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

from linglab.errors import LinglabError

OVERRIDES_HELP = "config overrides, e.g. --model.hidden_size=256 (any section.key of the config)"


def _unit(n: int) -> tuple[str, float]:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return unit, scale
    return "", 1.0


def _fmt(n: int, unit: tuple[str, float] | None = None) -> str:
    """2 decimals in the given (or the number's own) unit: 16.26B, 0.79B, 1.74M."""
    name, scale = unit or _unit(n)
    return f"{n / scale:.2f}{name}" if scale > 1 else str(n)


def _load_cfg(args, overrides):
    from linglab.config import load_config

    preset = "tiny" if args.preset is None else args.preset
    return load_config(preset=preset, path=getattr(args, "config", None), overrides=overrides)


def _run_cfg(args, overrides, out: Path, command: str):
    """The config of a job: preset + --config + overrides, or with --resume the run's own config.toml + overrides
    (`RunDir.resume_changes` then refuses any that would change what was trained)."""
    from linglab.config import load_config

    if not args.resume:
        return _load_cfg(args, overrides)
    if args.preset is not None or args.config is not None:
        raise LinglabError(f"{command}: --resume continues {out} with its own config.toml; drop --preset/--config "
                           "(changes go as --section.key=value)")
    if not (out / "config.toml").is_file():
        raise LinglabError(f"{command}: --resume given but {out} has no run to resume")
    return load_config(preset=None, path=out / "config.toml", overrides=overrides)


def _param_table(model, title: str):
    from rich.table import Table

    from linglab.model import count_parameters

    c = count_parameters(model)
    table = Table(title=title)
    table.add_column("parameters")
    table.add_column("count", justify="right")
    table.add_column("exact", justify="right")
    rows = [("total (without MTP)", c.total), ("active per token", c.active),
            ("active non-embedding", c.active_non_embedding), ("MTP layer", c.mtp)]
    unit = _unit(c.total)  # one unit for the whole table, so 0.79B reads beside 16.26B
    for name, n in rows:
        table.add_row(name, _fmt(n, unit), f"{n:,}")
    return table


def cmd_params(args, overrides) -> None:
    from rich.console import Console

    from linglab.model import build_model

    cfg = _load_cfg(args, overrides)
    model = build_model(cfg.model, device="meta")
    Console().print(_param_table(model, f"{args.preset or 'tiny'}"))


def _refuse_meta_preset(command: str, preset: str | None, cfg) -> None:
    """The released shapes exist on the meta device only (shapes and counts): materialising one is an OOM kill."""
    from linglab.config import META_PRESETS
    from linglab.model import build_model, count_parameters

    if preset in META_PRESETS:
        n = count_parameters(build_model(cfg.model, device="meta")).total
        raise LinglabError(f"{command}: preset {preset} has {_fmt(n)} parameters ({n * 4 / 2**30:.0f} GiB in fp32), "
                           "too large to materialise here; use tiny, small or tiny-linear (linglab params counts any preset)")


def _at_least(value: int, minimum: int, flag: str, command: str) -> int:
    if value < minimum:
        raise LinglabError(f"{command}: {flag} must be >= {minimum}, got {value}")
    return value


def cmd_init(args, overrides) -> None:
    from linglab.checkpoint import save_pretrained
    from linglab.model import build_model, count_parameters
    from linglab.run import check_output

    cfg = _load_cfg(args, overrides)
    out = Path(args.out)
    check_output(out, args.overwrite, "init")
    _refuse_meta_preset("init", args.preset, cfg)
    model = build_model(cfg.model, seed=args.seed)
    save_pretrained(model, out)
    print(f"wrote {out} ({_fmt(count_parameters(model).total)} parameters, seed {args.seed})")


def cmd_check(args, overrides) -> None:
    """Build the model, print its parameter table and time one forward/backward on a random batch."""
    import torch
    from rich.console import Console

    from linglab.model import build_model

    cfg = _load_cfg(args, overrides)
    _refuse_meta_preset("check", args.preset, cfg)
    _at_least(args.batch_size, 1, "--batch-size", "check")
    _at_least(args.seq_len, 1, "--seq-len", "check")
    console = Console()
    model = build_model(cfg.model, seed=args.seed)
    console.print(_param_table(model, f"{args.preset or 'tiny'}"))
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.model.vocab_size, (args.batch_size, args.seq_len + 1), generator=g)
    start = time.perf_counter()
    out = model(ids[:, :-1], targets=ids[:, 1:])
    out.loss.backward()
    elapsed = time.perf_counter() - start
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    mtp = f"{out.mtp_loss.item():.4f}" if out.mtp_loss is not None else "-"
    console.print(f"forward+backward on [{args.batch_size} x {args.seq_len}] tokens: loss {out.main_loss.item():.4f} "
                  f"(ln V = {torch.log(torch.tensor(float(cfg.model.vocab_size))).item():.4f}), MTP loss {mtp}, "
                  f"grad norm {grad_norm.item():.4f}, {elapsed:.2f} s")


def cmd_train(args, overrides) -> None:
    from linglab.train import run_training

    out = Path(args.out or f"runs/{args.preset or 'tiny'}")
    cfg = _run_cfg(args, overrides, out, "train")
    run_training(cfg, out, resume=args.resume, overwrite=args.overwrite, command=args.command_line,
                 init_from=args.init_from)


def cmd_merge(args, overrides) -> None:
    """WSM (SPEC §2): average checkpoints with weights that realise a target decay."""
    from linglab.merge import decay_schedule, merge_checkpoints, merge_weights_from_decay

    if overrides:
        raise LinglabError(f"merge: unexpected arguments {' '.join(overrides)}")
    ckpts = [Path(p) for p in args.ckpts]
    if len(ckpts) == 1 and (ckpts[0] / "checkpoints").is_dir():  # a run directory: its kept checkpoints
        from linglab.run import RunDir
        from linglab.train import STATE_NAME

        ckpts = RunDir(ckpts[0], "merge", STATE_NAME).checkpoints()
    if len(ckpts) < 2:
        raise LinglabError(f"merge: need at least 2 checkpoints, got {len(ckpts)}")
    from linglab.run import check_output

    check_output(Path(args.out), args.overwrite, "merge", inputs=ckpts)
    weights = merge_weights_from_decay(decay_schedule(args.decay, len(ckpts) - 1))
    merge_checkpoints(ckpts, weights, Path(args.out))
    for path, w in zip(ckpts, weights):
        print(f"  {w:.4f}  {path}")
    print(f"wrote {args.out} (merge of {len(ckpts)} checkpoints, target decay '{args.decay}')")


def cmd_convert(args, overrides) -> None:
    """A BailingMoeV2 checkpoint as a Ring-linear hybrid (SPEC §8), as Ring-mini-linear was made from Ling-mini."""
    from linglab.convert import convert_to_linear

    if overrides:
        raise LinglabError(f"convert: unexpected arguments {' '.join(overrides)}")
    hybrid = convert_to_linear(args.ckpt, args.out, args.layer_group_size, args.group_norm_size, args.overwrite)
    kinds = [hybrid.layer_kind(i) for i in range(hybrid.num_hidden_layers)]
    linear = [i for i, kind in enumerate(kinds) if kind == "linear"]
    softmax = [i for i, kind in enumerate(kinds) if kind == "softmax"]
    print(f"wrote {args.out} (BailingMoeLinearV2): linear layers {linear}, softmax layers {softmax}")


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def cmd_export(args, overrides) -> None:
    """Re-save a checkpoint as fp32 HF, or with --fp8 as the HF FP8 format (SPEC §1.6), with its tokenizer files."""
    from linglab.checkpoint import export_checkpoint, load_config_json

    if overrides:
        raise LinglabError(f"export: unexpected arguments {' '.join(overrides)}")
    from linglab.run import check_output

    ckpt, out = Path(args.ckpt), Path(args.out)
    load_config_json(ckpt)  # a missing or invalid --ckpt is reported before anything about --out
    check_output(out, args.overwrite, "export", inputs=[ckpt])
    before = _dir_mb(ckpt)
    export_checkpoint(ckpt, out, fp8=args.fp8)
    print(f"wrote {out} ({'fp8 e4m3, 128x128 blocks' if args.fp8 else 'fp32'}): {before:.2f} MB -> {_dir_mb(out):.2f} MB")


def cmd_generate(args, overrides) -> None:
    from linglab.checkpoint import from_pretrained
    from linglab.generate import generate
    from linglab.tokenizer import load_tokenizer

    if overrides:
        raise LinglabError(f"generate: unexpected arguments {' '.join(overrides)}")
    model = from_pretrained(args.ckpt)
    tokenizer = load_tokenizer(args.ckpt)
    prompt = args.prompt.replace("\\n", "\n")
    if args.chat:  # a user message through the tokenizer's chat template, as RL and eval render prompts
        from linglab.chat import render_prompt

        prompt = render_prompt(tokenizer, [{"role": "user", "content": prompt}], args.mode, args.system_prompt or "")
    elif not prompt.endswith("\n") and not args.raw:
        prompt += "\n"  # the embedded tasks put the answer after the prompt's newline
    print(prompt, end="", flush=True)
    pieces: list[int] = []

    def stream(row: int, token: int) -> None:  # decode the growing sequence; print only the new text
        before = tokenizer.decode(pieces)
        pieces.append(token)
        print(tokenizer.decode(pieces)[len(before):], end="", flush=True)

    generate(model, [tokenizer.encode(prompt)], args.max_new_tokens, tokenizer.stop_ids, temperature=args.temperature,
             top_p=args.top_p, seed=args.seed, use_cache=True, on_token=stream)
    print()


def cmd_eval(args, overrides) -> None:
    """With --data (or eval.data): greedy accuracy, pass@k and ApexEval of one or more checkpoints on a prompt file
    (`evals.evaluate_checkpoints`, SPEC §6). Without: held-out loss and greedy exact match per tier of one checkpoint
    on the embedded tasks, the evaluation a training run ends with (`evals.evaluate_run`; --json: also a file)."""
    from linglab.config import load_config

    flags = _data_overrides(args, "eval")
    if args.samples is not None:
        flags.append(f"--eval.samples={args.samples}")
    if args.ks is not None:
        flags.append(f"--eval.ks={args.ks}")
    if args.problems is not None:
        flags.append(f"--eval.problems={args.problems}")
    cfg = load_config(preset=None, path=args.config, overrides=overrides + flags).eval
    if cfg.data:
        if args.json:
            raise LinglabError("eval: --json is for the embedded held-out evaluation; with --data, --out DIR gets a "
                               "JSON per checkpoint and summary.json")
        from linglab.evals import evaluate_checkpoints

        evaluate_checkpoints(cfg, args.ckpt, args.out, overwrite=args.overwrite, resume=args.resume,
                             command=args.command_line)
        return
    data_only = [f for f in flags if not f.startswith("--eval.problems=")]
    if len(args.ckpt) != 1 or overrides or data_only or args.config or args.out or args.resume:
        raise LinglabError("eval: without --data, eval takes one --ckpt and --problems/--data-seed/--seq-len/--json "
                           "(the embedded held-out evaluation); the other options need --data FILE")
    args.ckpt = args.ckpt[0]
    _embedded_eval(args)


def _embedded_eval(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from linglab import evals
    from linglab.checkpoint import from_pretrained
    from linglab.config import MIN_SEQ_LEN
    from linglab.data import heldout_data
    from linglab.tasks import CORE_TIERS, TIERS, heldout_problems
    from linglab.tokenizer import load_tokenizer

    args.problems = 100 if args.problems is None else args.problems
    _at_least(args.problems, 1, "--problems", "eval")
    if args.json:
        json_path, ckpt_dir = Path(args.json).resolve(), Path(args.ckpt).resolve()
        if ckpt_dir in json_path.parents:
            raise LinglabError(f"eval: --json {args.json} lies inside the checkpoint {args.ckpt}; write it elsewhere")
        if Path(args.json).exists() and not args.overwrite:
            raise LinglabError(f"eval: {args.json} exists (pass --overwrite to replace it)")
    _at_least(args.seq_len, MIN_SEQ_LEN, "--seq-len", "eval")
    model = from_pretrained(args.ckpt)
    if args.seq_len > model.cfg.max_position_embeddings:
        raise LinglabError(f"eval: --seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                           f"({model.cfg.max_position_embeddings})")
    tokenizer = load_tokenizer(args.ckpt)
    data = heldout_data(tokenizer, heldout_problems(args.problems, CORE_TIERS, args.data_seed), args.seq_len)
    row = evals.evaluate_run(model, data, step=0)
    table = Table(title=f"held-out evaluation of {args.ckpt}")
    for col in ("tier", "description", "exact match", "n", "held-out loss"):
        table.add_column(col)
    tiers = {}
    for tier, problems in data.heldout_problems.items():
        name = TIERS[tier].name
        loss = row["heldout_loss_by_tier"].get(name)
        tiers[name] = {"accuracy": row["accuracy"][name], "n": len(problems), "heldout_loss": loss,
                       "description": TIERS[tier].description}
        table.add_row(name, TIERS[tier].description, f"{row['accuracy'][name]:.1%}", str(len(problems)),
                      "-" if loss is None else f"{loss:.4f}")
    Console().print(table)
    print(f"held-out loss, all tiers packed together (as a training run's final_eval.json): {row['heldout_loss']:.4f}")
    if args.json:
        result = {"ckpt": str(args.ckpt), "problems": args.problems, "data_seed": args.data_seed,
                  "seq_len": args.seq_len, "heldout_loss": row["heldout_loss"], "tiers": tiers, "command": args.command_line}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


def _positive_flops(text: str, what: str) -> float:
    """A FLOP count from the command line ("1e14"), or a one-line error: argparse's own would print the usage too."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise LinglabError(f"scaling: {what} must be a positive number of FLOPs, got {text!r}")
    return value


def cmd_scaling_sweep(args, overrides) -> None:
    """A resumable grid of training runs over compute budgets, one architecture axis at a time (SPEC §4)."""
    from linglab import scaling

    if overrides:
        raise LinglabError(f"scaling sweep: unexpected arguments {' '.join(overrides)}")
    budgets = [_positive_flops(b, "--budgets") for b in args.budgets] if args.budgets else None
    axes = [scaling.check_axis(a) for a in args.axis] if args.axis else None
    grid = scaling.load_grid(args.grid, budgets=budgets, axes=axes)
    if args.dry_run:
        runs, notes = scaling.plan_runs(grid)
        print("\n".join(scaling.describe_plan(runs, notes, grid)))
        return
    from linglab.run import RunDir

    sweep_dir = RunDir(args.out, "scaling sweep")
    sweep_dir.prepare(args.resume, args.overwrite)  # holds its lock while the sweep runs
    try:
        scaling.run_sweep(grid, Path(args.out), command=args.command_line)
    finally:
        sweep_dir.unlock()
    print(f"results: {Path(args.out) / 'results.jsonl'}; next: linglab scaling fit --dir {args.out}")


def cmd_scaling_fit(args, overrides) -> None:
    """Fit the sweep's results: loss vs compute, the held-out budget, L(N, D), optima, efficiency leverage (SPEC §4)."""
    from linglab import scaling

    if overrides:
        raise LinglabError(f"scaling fit: unexpected arguments {' '.join(overrides)}")
    if not (args.dir or (args.results and args.out)):
        raise LinglabError("scaling fit: give --dir DIR, or --results FILE and --out DIR")
    _at_least(args.bootstrap, 0, "--bootstrap", "scaling fit")
    results = Path(args.results) if args.results else Path(args.dir) / "results.jsonl"
    out = Path(args.out or args.dir)
    rows = scaling.read_results(results)
    if (out / "fit.json").exists() and not args.overwrite:
        raise LinglabError(f"scaling fit: {out / 'fit.json'} exists (pass --overwrite to replace the fit in {out})")
    record = results.parent / "sweep.json"
    commands = json.loads(record.read_text()).get("commands", []) if record.is_file() else []
    fit = scaling.write_fit(rows, out, n_boot=args.bootstrap, commands=[*commands, args.command_line])
    for note in fit["notes"]:
        print(f"note: {note}")
    if "holdout" in fit:
        h = fit["holdout"]
        print(f"held-out budget C = {h['compute']:.3g}: predicted {h['predicted']:.4f}, measured {h['actual']:.4f}, "
              f"error {h['abs_error']:.4f}")
    print(f"wrote {out / 'fit.json'}, {out / 'scaling.md'} and {out / 'plots'}/")


def cmd_scaling_suggest(args, overrides) -> None:
    """A training config for a compute budget from the fitted laws (--fit) or the published ones (SPEC §4)."""
    from linglab import scaling

    if overrides:
        raise LinglabError(f"scaling suggest: unexpected arguments {' '.join(overrides)}")
    compute = _positive_flops(args.compute, "--compute")
    fit = scaling.read_fit(args.fit) if args.fit else None
    cfg, info = scaling.suggest_config(compute, fit, seq_len=args.seq_len)
    text = scaling.suggestion_toml(cfg, info)
    print(text, end="")
    if args.out:
        if Path(args.out).is_dir():
            raise LinglabError(f"scaling suggest: --out {args.out} is a directory, expected a TOML file")
        if Path(args.out).exists() and not args.overwrite:
            raise LinglabError(f"scaling suggest: {args.out} exists (pass --overwrite to replace it)")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"# wrote {args.out} (from the {'fitted laws in ' + args.fit if fit else 'published laws'}); "
              f"train it with: linglab train --config {args.out}")


# The prompt-set flags of rl, sft and eval: each is the config key `<section>.<key>` (SPEC §10; linglab.datasets).
DATA_FLAGS = (("data", "data"), ("eval_data", "eval_data"), ("format", "data_format"), ("verifier", "verifier"),
              ("mode", "mode"), ("system_prompt", "system_prompt"), ("variants", "variants"))


def _data_overrides(args, section: str) -> list[str]:
    """The prompt-set flags given, as `--section.key=value` overrides (so they land in config.toml and a resume
    checks them like any other key)."""
    found = [f"--{section}.{key}={getattr(args, flag)}" for flag, key in DATA_FLAGS
             if getattr(args, flag, None) is not None]
    return found + ([f"--{section}.skip_bad_rows=true"] if getattr(args, "skip_bad_rows", False) else [])


def cmd_rl(args, overrides) -> None:
    """RL post-training from a checkpoint (SPEC §5): rollouts, rewards, the policy loss, before/after evaluation."""
    from linglab.rl.trainer import run_rl

    cfg = _run_cfg(args, overrides + _data_overrides(args, "rl"), Path(args.out), "rl")
    run_rl(cfg, args.ckpt, args.out, resume=args.resume, overwrite=args.overwrite, command=args.command_line)


def cmd_sft(args, overrides) -> None:
    """Supervised fine-tuning on worked solutions, written as an HF checkpoint (the optional stage before RL)."""
    from linglab.rl.sft import run_sft

    cfg = _run_cfg(args, overrides + _data_overrides(args, "rl"), Path(args.out), "sft")
    run_sft(cfg, args.ckpt, args.out, resume=args.resume, overwrite=args.overwrite, command=args.command_line)


def cmd_pipeline(args, overrides) -> None:
    """The main job: pretrain -> RL -> evaluation -> one report.md (`make run`)."""
    from linglab.pipeline import run_pipeline

    cfg = _run_cfg(args, overrides, Path(args.out), "pipeline")
    run_pipeline(cfg, args.out, resume=args.resume, overwrite=args.overwrite, command=args.command_line,
                 rl_seeds=args.rl_seeds)


def cmd_plan(args, overrides) -> None:
    """Uniform vs planned pipeline partition of a model over stages and virtual stages (SPEC §7)."""
    from linglab.parallel.planner import compare_plans, format_comparison

    cfg = _load_cfg(args, overrides)
    uniform, planned, unit = compare_plans(cfg, args.stages, args.virtual, args.micro_batches, args.measured)
    print(format_comparison(uniform, planned, args.micro_batches, unit, f"pipeline plan for {args.preset}"))


def _tier_list(text: str, command: str) -> list[int]:
    """Comma-separated tier numbers ("1,2"; a repeat weights a tier), or a one-line error."""
    from linglab.tasks import TIERS

    try:
        tiers = [int(t) for t in text.split(",")]
    except ValueError:
        tiers = []
    if not tiers or not all(0 <= t < len(TIERS) for t in tiers):
        raise LinglabError(f"{command}: --tiers must be comma-separated tiers in 0..{len(TIERS) - 1}, got {text!r}")
    return tiers


def cmd_tasks_export(args, overrides) -> None:
    """The embedded tasks as a generic-shape JSONL prompt file (SPEC §10). The defaults are `linglab rl`'s own: the
    train split is the prompt stream it trains on, the held-out split the problems it evaluates on, so `--rl.data`
    (and `--rl.eval_data`) of the files reproduce the default run."""
    from linglab.config import RLConfig
    from linglab.datasets import embedded_prompt_set, write_jsonl
    from linglab.rl.sft import EVAL_TIERS

    command = "tasks export"
    if overrides:
        raise LinglabError(f"{command}: unexpected arguments {' '.join(overrides)}")
    rl, train = RLConfig(), args.split == "train"
    tiers = _tier_list(args.tiers, command) if args.tiers else list(rl.tiers if train else EVAL_TIERS)
    n = _at_least(args.n, 1, "--n", command) if args.n is not None else (rl.train_problems if train else rl.eval_problems)
    seed = rl.seed if args.seed is None else args.seed
    out = Path(args.out)
    if out.is_dir():
        raise LinglabError(f"{command}: --out {out} is a directory, expected a .jsonl file")
    if out.exists() and not args.overwrite:
        raise LinglabError(f"{command}: {out} exists (pass --overwrite to replace it)")
    prompts = embedded_prompt_set(tiers, seed, n_train=n if train else 0, n_heldout=0 if train else n)
    examples = prompts.train if train else prompts.heldout
    write_jsonl(examples, out)
    print(f"wrote {len(examples)} {args.split} problems of tiers {','.join(map(str, tiers))} (seed {seed}) to {out}")


class _Parser(argparse.ArgumentParser):
    """argparse with linglab's one-line errors (exit code 2, no usage block); subparsers inherit the class."""

    def error(self, message: str):
        # `--compute -1e14`: argparse reads a value that starts with '-' as an option and says "expected one argument".
        m = re.match(r"argument (-[^/:]+)\S*: expected one argument", message)
        hint = f" (write {m.group(1)}=VALUE for a value that starts with '-')" if m else ""
        raise LinglabError(f"{self.prog}: {message}{hint}")


def build_parser() -> argparse.ArgumentParser:
    from linglab.config import CHAT_MODES, DATA_FORMATS, PRESETS, VERIFIER_KINDS

    parser = _Parser(prog="linglab", description="The Ling 2.0 recipe in readable PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_config_args(p):
        p.add_argument("--preset", choices=list(PRESETS), help="starting config (default: tiny; with --resume the "
                       "run's own config.toml)")
        p.add_argument("--config", help="TOML file applied over the preset ([section] tables of keys)")
        p.epilog = OVERRIDES_HELP

    def add_data_args(p, section: str):
        """The prompt-set flags (SPEC §10), each a shortcut for the config key named in its help."""
        p.add_argument("--data", help=f"prompt file or directory: JSONL/Parquet rows of GSM8K, MATH, generic or chat "
                       f"shape ({section}.data; default: the embedded tiers)")
        if section == "rl":
            p.add_argument("--eval-data", help="held-out prompt file (rl.eval_data; default: a stable-hash split of --data)")
        p.add_argument("--format", choices=DATA_FORMATS, help=f"row shape ({section}.data_format; default auto)")
        p.add_argument("--verifier", choices=VERIFIER_KINDS, help=f"answer checker ({section}.verifier; default auto: "
                       "math for MATH rows, else numeric)")
        p.add_argument("--mode", choices=CHAT_MODES, help=f"chat template mode ({section}.mode; default instant)")
        p.add_argument("--system-prompt", help=f"system message before every prompt ({section}.system_prompt)")
        p.add_argument("--variants", help=f"ApexEval prompt variants, a JSONL file ({section}.variants)")
        p.add_argument("--skip-bad-rows", action="store_true", help=f"skip malformed rows, counted in the report "
                       f"({section}.skip_bad_rows; default: stop at the first with its file and line)")

    p = sub.add_parser("params", help="print total, active and non-embedding active parameters")
    add_config_args(p)
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("init", help="write a randomly initialised HF BailingMoeV2 checkpoint")
    add_config_args(p)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0, help="init seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("check", help="build the model, print its parameter table, run one forward/backward")
    add_config_args(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("train", help="pretrain a model (default: tiny preset on the embedded arithmetic corpus)")
    add_config_args(p)
    p.add_argument("--out", help="run directory (default: runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run in --out and start over")
    p.add_argument("--init-from", metavar="CKPT", help="start from this checkpoint's weights (same model shape; "
                   "fresh optimizer, step 0; its tokenizer unless data.tokenizer is set); a resume ignores it once "
                   "the run has checkpoints of its own")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("merge", help="WSM: merge checkpoints with weights from a target decay (SPEC §2)")
    p.add_argument("ckpts", nargs="+", help="checkpoint dirs, oldest first, or one run dir (its kept checkpoints)")
    p.add_argument("--out", required=True, help="merged checkpoint directory to write")
    p.add_argument("--decay", default="linear", choices=["linear", "cosine", "sqrt"],
                   help="target decay the merge emulates (linear = plain mean; default)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="re-save a checkpoint as fp32 HF, or with --fp8 in the HF FP8 format")
    p.add_argument("--ckpt", required=True, help="checkpoint directory to read (its tokenizer files are copied along)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--fp8", action="store_true",
                   help="store the FP8 GEMM weights as E4M3 with 128x128-block fp32 scale_inv (SPEC §1.6); "
                        "embeddings, lm_head, norms, router and MTP eh_proj stay fp32")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="a BailingMoeV2 checkpoint as a Ring-linear hybrid BailingMoeLinearV2 (SPEC §8)")
    p.add_argument("--to", required=True, choices=["linear"], help="target family (linear: BailingMoeLinearV2)")
    p.add_argument("--ckpt", required=True, help="BailingMoeV2 checkpoint directory (its tokenizer files are copied along)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--layer-group-size", type=int, required=True,
                   help="one softmax layer closes each group of N layers; the others become linear (SPEC §8)")
    p.add_argument("--group-norm-size", type=int, default=1, help="groups of the linear layers' GroupRMSNorm (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="sample from a checkpoint, streaming (KV cache)")
    p.add_argument("--ckpt", required=True, help="checkpoint directory with its tokenizer files")
    p.add_argument("--prompt", required=True, help="prompt text (\\n for newlines), e.g. '47+58=?'")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through the tokenizer's "
                   "chat template (with --mode, --system-prompt)")
    p.add_argument("--mode", choices=CHAT_MODES, default="instant", help="chat template mode with --chat")
    p.add_argument("--system-prompt", help="system message with --chat")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="do not append a newline to the prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="checkpoints on a prompt file: greedy, pass@k, ApexEval (--data); without --data, "
                       "held-out loss and exact match per tier of one checkpoint")
    p.add_argument("--config", help="TOML file with an [eval] table (the eval.* keys)")
    p.add_argument("--ckpt", required=True, action="append", help="checkpoint directory with tokenizer.json "
                   "(repeat to compare checkpoints, with --data)")
    add_data_args(p, "eval")
    p.add_argument("--samples", type=int, help="with --data: samples per question for pass@k and ApexEval (default 8)")
    p.add_argument("--ks", help="with --data: k of pass@k, e.g. 1,4,8 (ApexEval uses the largest)")
    p.add_argument("--out", help="with --data: directory for one JSON per checkpoint and summary.json")
    p.add_argument("--resume", action="store_true", help="with --data --out: keep the checkpoints already evaluated")
    p.add_argument("--problems", type=int, help="held-out problems per tier (default 100); with --data, questions per "
                   "subset (default all)")
    p.add_argument("--data-seed", type=int, default=0, help="data.seed of the training run (default 0)")
    p.add_argument("--seq-len", type=int, default=128, help="data.seq_len of the training run (default 128)")
    p.add_argument("--json", help="also write the results to this JSON file (heldout_loss, tiers: accuracy, n, "
                   "heldout_loss per tier)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file or --out directory")
    p.epilog = "with --data, also [eval] keys as --eval.key=value, e.g. --eval.max_new_tokens=512"
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("scaling", help="scaling-law sweep, fits and suggested configs (SPEC §4)")
    scaling_sub = p.add_subparsers(dest="scaling_command", required=True)
    s = scaling_sub.add_parser("sweep", help="train a resumable grid of runs over compute budgets, one axis at a time")
    s.add_argument("--out", required=True, help="sweep directory: results.jsonl, runs/<name>/, tokenizer.json")
    s.add_argument("--grid", help="TOML file of grid fields (top-level keys of linglab.scaling.ladder.SweepGrid) over the default")
    s.add_argument("--budgets", nargs="+", help="compute budgets of the shape axis in FLOPs, e.g. 3e11 1e12 3e12")
    s.add_argument("--axis", action="append", help="shape, activation or granularity (repeatable; default: the grid's axes)")
    s.add_argument("--dry-run", action="store_true", help="print the planned runs and their estimated time, train nothing")
    s.add_argument("--resume", action="store_true", help="continue the sweep in --out: runs already in results.jsonl are kept")
    s.add_argument("--overwrite", action="store_true", help="delete the sweep in --out and start over")
    s.set_defaults(func=cmd_scaling_sweep)
    s = scaling_sub.add_parser("fit", help="fit a sweep's results.jsonl: fit.json, scaling.md and plots")
    s.add_argument("--dir", help="sweep directory: reads DIR/results.jsonl and writes into DIR")
    s.add_argument("--results", help="results.jsonl to read (instead of DIR/results.jsonl)")
    s.add_argument("--out", help="directory to write (default: --dir)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing fit (fit.json, scaling.md, plots/)")
    s.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals of L(C), M_opt and L(N, D) "
                   "(0 = none)")
    s.set_defaults(func=cmd_scaling_fit)
    s = scaling_sub.add_parser("suggest", help="a TOML training config for a compute budget, from fitted or published laws")
    s.add_argument("--compute", required=True, help="compute budget C in FLOPs, e.g. 1e14")
    s.add_argument("--fit", help="fit.json of `linglab scaling fit` (default: the published laws of SPEC §4)")
    s.add_argument("--out", help="TOML file to write (for linglab train --config FILE)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    s.add_argument("--seq-len", type=int, default=128)
    s.set_defaults(func=cmd_scaling_suggest)
    p = sub.add_parser("rl", help="RL post-training of a checkpoint: GRPO/DAPO/Dr.GRPO/GSPO/LPO, IcePop/TIS, C3PO++; "
                       "under torchrun, colocated on every rank")
    add_config_args(p)
    p.add_argument("--ckpt", help="HF checkpoint directory with tokenizer.json to start from (not needed with --resume)")
    p.add_argument("--out", required=True, help="run directory")
    add_data_args(p, "rl")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run in --out and start over")
    p.set_defaults(func=cmd_rl)

    p = sub.add_parser("sft", help="supervised fine-tuning on worked solutions (rl.sft_* keys), before RL")
    add_config_args(p)
    p.add_argument("--ckpt", help="HF checkpoint directory with tokenizer.json to start from (not needed with --resume)")
    p.add_argument("--out", required=True, help="directory for the fine-tuned HF checkpoint and its metrics")
    add_data_args(p, "rl")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing --out first")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("pipeline", help="the main job (make run): pretrain -> RL -> evaluation -> one report.md")
    add_config_args(p)
    p.add_argument("--out", required=True, help="pipeline directory: pretrain/, rl/ (rl-seed<s>/ with several RL "
                   "seeds), summary.json, report.md")
    p.add_argument("--resume", action="store_true", help="keep finished stages, resume the unfinished one")
    p.add_argument("--overwrite", action="store_true", help="delete an existing pipeline in --out and start over")
    p.add_argument("--rl-seeds", type=int, help="RL runs from the one pretraining, rl.seed, rl.seed + 1, ...: the "
                   "report gives the gain's spread over them (default 1, or as many as the run being resumed has; "
                   "make run uses 3)")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("plan", help="heterogeneous pipeline plan: uniform vs planned stage partition (SPEC §7)")
    p.add_argument("--preset", default="ling-mini-2.0", choices=sorted(PRESETS), help="model shape (default ling-mini-2.0)")
    p.add_argument("--stages", type=int, default=4, help="pipeline ranks S")
    p.add_argument("--virtual", type=int, default=1, help="virtual stages per rank V (interleaved schedule)")
    p.add_argument("--micro-batches", type=int, default=32, help="micro-batches M for the step-time estimate")
    p.add_argument("--measured", action="store_true", help="time each unit kind on this machine instead of counting FLOPs")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("tasks", help="the embedded arithmetic tasks as prompt files (linglab.tasks, SPEC §10)")
    tasks_sub = p.add_subparsers(dest="tasks_command", required=True)
    s = tasks_sub.add_parser("export", help="write the embedded tasks as a generic-shape JSONL (default: the prompts "
                             "linglab rl trains on)")
    s.add_argument("--out", required=True, help="the .jsonl file to write")
    s.add_argument("--split", choices=["train", "heldout"], default="train",
                   help="train: the prompts linglab rl trains on; heldout: the problems it evaluates on (default train)")
    s.add_argument("--tiers", help="comma-separated tiers, e.g. 1,2; 3 is the opt-in long tier "
                   "(default: rl.tiers for train, the core tiers 0,1,2 for heldout)")
    s.add_argument("--n", type=int, help="problems (train, default rl.train_problems) or problems per tier (heldout, "
                   "default rl.eval_problems)")
    s.add_argument("--seed", type=int, help="the seed of the problems (default rl.seed)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    s.set_defaults(func=cmd_tasks_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args, rest = build_parser().parse_known_args(argv)
        args.command_line = "linglab " + shlex.join(sys.argv[1:] if argv is None else argv)  # recorded in result files
        args.func(args, rest)
    except LinglabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
