"""benchmarks/rl_system.py times the RL trainer on the long tier's lengths: check that its rollouts have them, in the
synchronous arm and through C3PO++'s pool, so the figure measures what its docstring says."""

import sys
from pathlib import Path

import pytest

from linglab.config import load_config
from linglab.tasks import iter_corpus_texts
from linglab.tokenizer import Tokenizer

# benchmarks/ and experiments/fp8/ each have a common.py, and a pytest worker may have imported the other one:
# this script imports its own, and leaves the name free for the next.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.modules.pop("common", None)
import rl_system  # noqa: E402

sys.modules.pop("common", None)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_rl_arms_sample_each_response_as_long_as_its_solution(tmp_path):
    tokenizer = Tokenizer.train(iter_corpus_texts(300, seed=0), vocab_size=300)
    ckpt = rl_system.start_checkpoint(tokenizer, tmp_path / "start")
    sync = load_config("tiny", overrides=rl_system.rl_overrides(2, 2, 2)).rl
    lengths = rl_system.solution_lengths(sync, tokenizer)
    assert max(lengths.values()) > 4 * min(lengths.values())  # the long tier's tail
    c3po = load_config("tiny", overrides=rl_system.rl_overrides(2, 2, 2, c3po="true", c3po_capacity=8,
                                                                 c3po_budget=60)).rl
    for name, cfg in (("sync", sync), ("c3po", c3po)):
        trainer = rl_system.long_tier_trainer(ckpt, tokenizer, cfg, lengths, tmp_path / name)
        for _ in range(2):
            groups, stats = trainer.collect()
            rollouts = [r for g in groups for r in g.rollouts]
            assert rollouts and all(r.truncated and not r.eos for r in rollouts)
            assert [r.cost for r in rollouts] == [lengths[tuple(r.prompt)] for r in rollouts]
            trainer.engine.version += 1  # as the next step's sync would
    assert stats["carried_groups"] + stats["purged_groups"] > 0  # C3PO++ left some group unfinished
