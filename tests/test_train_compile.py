"""train.compile: compiled decoder layers give eager's loss and gradients, FP8 included, and runs resume across modes.

Compiling costs seconds per graph, so the model is the two-layer tiny of test_train's FAST runs and the tests are few.
"""

import copy
import json

import pytest
import torch
from conftest import slow
from test_train import FAST

from linglab.cli import main
from linglab.config import load_config
from linglab.model import build_model
from linglab.train import apply_fp8, compile_blocks


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@slow
@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_a_compiled_step_matches_eager(fp8, one_thread):
    cfg = load_config("tiny", overrides=FAST + [f"--fp8.enabled={str(fp8).lower()}"])
    eager = build_model(cfg.model, seed=0)
    apply_fp8(eager, cfg.fp8)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints keep their names
    ids = torch.randint(0, cfg.model.vocab_size, (8, 65), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # the second step runs the compiled graphs, not their first trace
        loss, grads = _loss_and_grads(compiled, ids)
    ref_loss, ref_grads = _loss_and_grads(eager, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        if fp8:  # fp32 rounding differences move a few values across an E4M3 rounding boundary (steps of 6%)
            assert (grad - ref_grads[name]).norm() <= 3e-2 * ref_grads[name].norm(), name
        else:
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row["kind"] == "train"]


def test_compiled_and_eager_runs_resume_each_other(tmp_path, one_thread):
    # wsm: a constant LR after warm-up, so a resumed run may extend max_steps without changing the schedule.
    common = ["train", *FAST, "--train.schedule=wsm", "--train.warmup_steps=2", "--train.ckpt_every=2"]
    assert main([*common, "--out", str(tmp_path / "eager"), "--train.max_steps=6"]) == 0
    mixed = str(tmp_path / "mixed")
    assert main([*common, "--out", mixed, "--train.max_steps=2"]) == 0
    assert main([*common, "--out", mixed, "--train.max_steps=4", "--train.compile=true", "--resume"]) == 0
    assert main([*common, "--out", mixed, "--train.max_steps=6", "--resume"]) == 0
    eager, resumed = _losses(tmp_path / "eager"), _losses(tmp_path / "mixed")
    assert len(resumed) == 6
    assert resumed[:2] == eager[:2]
    assert resumed == pytest.approx(eager, rel=1e-4)
