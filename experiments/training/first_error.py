"""Where greedy solutions go wrong: the first line that differs from the reference solution, per tier and family.

Uses the same held-out problems as `linglab eval` / the run's final evaluation (seed data.seed + 1 + tier).
Line 0 is the restatement (a copy of the operands, or the translation of a word problem); lines 1.. are the
worked column steps; the last line is the answer.

    .venv/bin/python experiments/training/first_error.py runs/tiny [--out docs/results/tiny/first_error.json]
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from linglab.checkpoint import from_pretrained  # noqa: E402
from linglab.config import load_config  # noqa: E402
from linglab.evals import MAX_NEW_TOKENS  # noqa: E402
from linglab.generate import generate_text  # noqa: E402
from linglab.tasks import TIERS, generate_problems, is_correct  # noqa: E402
from linglab.tokenizer import load_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="JSON file to write (default: <run_dir>/first_error.json)")
    args = parser.parse_args()
    cfg = load_config(path=args.run_dir / "config.toml")
    model = from_pretrained(args.run_dir / "final").eval()
    tokenizer = load_tokenizer(args.run_dir / "final" / "tokenizer.json")
    result = {}
    for tier in sorted(set(cfg.data.tiers)):
        problems = generate_problems(cfg.train.eval_problems, tiers=[tier], seed=cfg.data.seed + 1 + tier, split="heldout")
        outputs = generate_text(model, tokenizer, [p.prompt for p in problems], max_new_tokens=MAX_NEW_TOKENS,
                                temperature=0.0)
        counts, examples = Counter(), []
        for p, out in zip(problems, outputs):
            if is_correct(out, p):
                counts["correct"] += 1
                continue
            want, got = p.solution.split("\n"), out.split("\n")
            line = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            where = "restatement" if line == 0 else ("answer" if line >= len(want) - 1 else "step")
            counts[f"{where}:{p.family}"] += 1
            if len(examples) < 8:
                examples.append({"prompt": p.prompt.strip(), "line": line, "want": want[line] if line < len(want) else None,
                                 "got": got[line] if line < len(got) else None})
        result[TIERS[tier].name] = {"n": len(problems), "counts": dict(counts.most_common()), "examples": examples}
        print(TIERS[tier].name, dict(counts.most_common()))
    out = args.out or args.run_dir / "first_error.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
