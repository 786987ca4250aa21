"""Training under torchrun (SPEC §7, issue 7): gloo ranks against one process, and checkpoints across layouts.

One 2-rank launch trains the runs the module fixture compares (a spawn costs seconds on a 2-core machine);
one 4-rank launch checks dp=2 x ep=2; the single-process runs happen in the test process. All runs see the
same global batches (batch 8 in 2 micro-batches, so each of 2 ranks holds 2 rows of each) with a constant LR
after warmup (WSM), so a run stopped at step 3 and resumed to step 6 follows the same schedule as one that
ran 6 steps.

Tolerance across layouts: 2e-5 on checkpoint tensors (expert biases included), 1e-5 relative on losses and
gradient norms. Ranks sum the same fp32 terms in another order (each rank's partial mean, then the average
over ranks), which moves weights by ~3e-6 after 6 AdamW steps at lr 3e-3 here; a wrong loss scale, an expert
gradient counted twice or loads not summed over ranks shows as a different gradient norm (AdamW itself hides
a uniform gradient scale), loss, or an expert bias off by a whole update (1e-3). Same layout: bit-exact.
"""

import functools
import json
import shutil

import pytest
import torch
import torch.distributed as dist
from dist_utils import requires_gloo, run_on_ranks
from safetensors.torch import load_file

import linglab.train
from linglab.cli import main
from linglab.config import ParallelConfig, load_config
from linglab.data import build_data
from linglab.errors import LinglabError
from linglab.model import build_model
from linglab.parallel.parallel_dims import init_parallel
from linglab.run import RunDir
from linglab.train import Trainer, build_trainer

pytestmark = requires_gloo

FAST = ["--model.num_hidden_layers=2", "--data.seq_len=32", "--data.num_documents=400", "--train.batch_size=8",
        "--train.grad_accum=2", "--train.warmup_steps=2", "--train.schedule=wsm", "--train.ckpt_every=3",
        "--train.eval_every=0", "--train.eval_problems=2", "--train.num_samples=1"]
# FAST's 2 layers as a Ring-linear hybrid (SPEC §8): layer 0 linear (dense FFN), layer 1 and the MTP layer softmax (MoE).
HYBRID = ["--model.layer_group_size=2", "--model.group_norm_size=2"]
WEIGHT_ATOL, RTOL = 2e-5, 1e-5
TIMING = ("time", "tokens_per_s", "mfu")


def _config(tokenizer, steps: int, *extra: str):
    return load_config("tiny", overrides=[*FAST, f"--data.tokenizer={tokenizer}", f"--train.max_steps={steps}", *extra])


def _skip_peak_measurement() -> None:
    """The MFU denominator is a 4096^2 GEMM timed per Trainer: seconds per run on 2 shared cores, and unused here."""
    linglab.train.matmul_peak_flops = lambda repeats=2, device="cpu": 1e11


def _fit(cfg, run_dir, resume: bool = False) -> Trainer:
    """run_training's loop on every rank of the launch, without its final evaluations and report."""
    dims = init_parallel(cfg.parallel, torch.device("cpu"))
    if not resume:
        dims.on_main(lambda: RunDir(run_dir).prepare(resume=False, overwrite=True))
    data = build_data(cfg.data, run_dir, cfg.train.eval_problems, save_tokenizer=dims.is_main)
    trainer = build_trainer(cfg, RunDir(run_dir), data, build_model(cfg.model, seed=cfg.train.seed), log=lambda *a: None,
                            dims=dims)
    if resume:
        assert trainer.resume() is not None
    trainer.fit()
    return trainer


def _copy_then_resume(cfg, src, dst, rank: int) -> None:
    if rank == 0:
        shutil.copytree(src, dst)
    dist.barrier()
    _fit(cfg, dst, resume=True)


def _two_rank_runs(rank, world_size, root, tokenizer):
    _skip_peak_measurement()
    _fit(_config(tokenizer, 6), root / "dp2")  # (a)
    _fit(_config(tokenizer, 3), root / "dp2-to3")
    _copy_then_resume(_config(tokenizer, 6), root / "dp2-to3", root / "dp2-resumed-on-2", rank)  # (b) 2 -> 2
    _copy_then_resume(_config(tokenizer, 6), root / "single-to3", root / "single-resumed-on-2", rank)  # (b) 1 -> 2
    _fit(_config(tokenizer, 6, "--parallel.ep=2"), root / "ep2")  # (c)
    _fit(_config(tokenizer, 6, "--parallel.ep=2", "--train.recompute=full"), root / "ep2-recompute")  # (d)
    _fit(_config(tokenizer, 6, *HYBRID, "--parallel.ep=2"), root / "hybrid-ep2")  # (e)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """One tokenizer for every run of the module."""
    root = tmp_path_factory.mktemp("tokenizer")
    cfg = load_config("tiny", overrides=FAST)
    build_data(cfg.data, root, cfg.train.eval_problems)
    return root / "tokenizer.json"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread, tokenizer):
    root = tmp_path_factory.mktemp("runs")
    real_peak = linglab.train.matmul_peak_flops
    _skip_peak_measurement()
    try:
        _train_all(root, tokenizer)
    finally:
        linglab.train.matmul_peak_flops = real_peak
    return root


def _train_all(root, tokenizer) -> None:
    _fit(_config(tokenizer, 6), root / "single")
    _fit(_config(tokenizer, 3), root / "single-to3")
    _fit(_config(tokenizer, 6, *HYBRID), root / "hybrid-single")
    run_on_ranks(functools.partial(_two_rank_runs, root=root, tokenizer=tokenizer), root)
    for src, dst in (("dp2-to3", "dp2-resumed-on-1"), ("ep2", "ep2-resumed-on-1")):
        shutil.copytree(root / src, root / dst)
        shutil.rmtree(root / dst / "checkpoints" / "step_000006", ignore_errors=True)  # ep2 ran to 6
        _fit(_config(tokenizer, 6), root / dst, resume=True)  # 2 -> 1 (dp), 2 -> 1 (ep)


def _train_rows(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows if r["kind"] == "train"]


def _final_weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "step_000006" / "model.safetensors"))


def _assert_same_run_within_tolerance(run, reference):
    rows, ref_rows = _train_rows(run), _train_rows(reference)
    assert [r["step"] for r in rows] == list(range(1, 7)), "each step is logged once, resumed or not"
    for row, ref in zip(rows, ref_rows):
        for key in ("loss", "main_loss", "mtp_loss", "grad_norm"):
            assert row[key] == pytest.approx(ref[key], rel=RTOL), f"{run.name} step {row['step']}: {key}"
        assert row["tokens"] == ref["tokens"] and row["skipped"] is False
    weights, ref_weights = _final_weights(run), _final_weights(reference)
    assert weights.keys() == ref_weights.keys()
    worst = max(weights, key=lambda k: (weights[k] - ref_weights[k]).abs().max().item())
    diff = (weights[worst] - ref_weights[worst]).abs().max().item()
    assert diff <= WEIGHT_ATOL, f"{run.name}: {worst} differs by {diff:.3g} from {reference.name}"
    state = torch.load(run / "checkpoints" / "step_000006" / "train_state.pt", weights_only=False)
    assert state["loader"] == {"epoch": 0, "position": 6 * 8}


def test_two_rank_data_parallel_training_equals_the_single_process_run(runs):
    _assert_same_run_within_tolerance(runs / "dp2", runs / "single")
    # Only rank 0 wrote: one metrics line per step, one set of checkpoint files.
    assert sorted(p.name for p in (runs / "dp2" / "checkpoints").iterdir()) == ["step_000003", "step_000006"]


def test_resume_on_the_same_layout_is_bit_exact(runs):
    resumed, uninterrupted = runs / "dp2-resumed-on-2", runs / "dp2"
    assert _train_rows(resumed) == _train_rows(uninterrupted)
    for name in ("model.safetensors", "config.json"):
        a = (resumed / "checkpoints" / "step_000006" / name).read_bytes()
        assert a == (uninterrupted / "checkpoints" / "step_000006" / name).read_bytes(), name
    states = [torch.load(r / "checkpoints" / "step_000006" / "train_state.pt", weights_only=False)
              for r in (resumed, uninterrupted)]
    for name, per in states[1]["optimizer"]["state"].items():
        for key, t in per.items():
            assert torch.equal(states[0]["optimizer"]["state"][name][key], t), f"{name} {key}"


@pytest.mark.parametrize("run", ["dp2-resumed-on-1", "single-resumed-on-2", "ep2-resumed-on-1"])
def test_checkpoints_resume_across_layouts(runs, run):
    _assert_same_run_within_tolerance(runs / run, runs / "single")


def test_expert_parallel_training_equals_the_single_process_run(runs):
    _assert_same_run_within_tolerance(runs / "ep2", runs / "single")


def test_a_hybrid_under_expert_parallel_and_fsdp2_equals_its_single_process_run(runs):
    """ep=2 on 2 ranks: the routed experts sliced over both, every other parameter (the linear layer's included)
    FSDP2-sharded over both."""
    _assert_same_run_within_tolerance(runs / "hybrid-ep2", runs / "hybrid-single")


def _dp2_ep2(rank, world_size, root, tokenizer):
    _skip_peak_measurement()
    _fit(_config(tokenizer, 6, "--parallel.ep=2"), root / "dp2-ep2")


def test_two_expert_parallel_groups_on_four_ranks_equal_the_single_process_run(runs, tokenizer, tmp_path):
    """dp=2 x ep=2: experts FSDP2-sharded over the 2 ranks holding the same slice, 1 row per rank and micro-batch."""
    run_on_ranks(functools.partial(_dp2_ep2, root=tmp_path, tokenizer=tokenizer), tmp_path, world_size=4)
    _assert_same_run_within_tolerance(tmp_path / "dp2-ep2", runs / "single")


def test_recompute_inside_fsdp2_and_expert_parallel_equals_the_single_process_run(runs):
    """train.recompute=full on 2 ranks: each FSDP2-sharded decoder layer, expert-parallel all-to-all included, runs its
    forward again in backward (`linglab.recompute`); the run is the single process's without recompute."""
    _assert_same_run_within_tolerance(runs / "ep2-recompute", runs / "single")


def _non_finite_on_rank_1(rank, world_size, root, tokenizer):
    _skip_peak_measurement()
    cfg = _config(tokenizer, 3)
    dims = init_parallel(cfg.parallel, torch.device("cpu"))
    dims.on_main(lambda: RunDir(root / "run").prepare(resume=False, overwrite=True))
    data = build_data(cfg.data, root / "run", cfg.train.eval_problems, save_tokenizer=dims.is_main)
    trainer = build_trainer(cfg, RunDir(root / "run"), data, build_model(cfg.model, seed=0), log=lambda *a: None, dims=dims)
    real_forward = trainer.model.forward

    def forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        if rank == 1 and trainer.step == 1:  # rank 0's loss stays finite
            out.loss, out.main_loss = out.loss * float("inf"), out.main_loss * float("inf")
        return out

    trainer.model.forward = forward
    trainer.train_step()
    before, _ = dims.full_state(trainer.model)
    assert trainer.train_step()["skipped"], f"rank {rank} stepped"
    after, _ = dims.full_state(trainer.model)
    assert all(torch.equal(before[k], after[k]) for k in before), f"rank {rank}: weights or expert biases moved"
    assert not trainer.train_step()["skipped"] and trainer.counters["skipped"] == 1


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path, tokenizer):
    run_on_ranks(functools.partial(_non_finite_on_rank_1, root=tmp_path, tokenizer=tokenizer), tmp_path)


def _layout_errors(rank, world_size, tokenizer):
    _skip_peak_measurement()
    for dp, ep, message in ((1, 1, "dp=1 x ep=1 = 1 ranks, but 2 were started"),
                            (2, 2, "dp=2 x ep=2 = 4 ranks, but 2 were started"),
                            (0, 4, "dp=1 x ep=4 = 4 ranks, but 2 were started")):  # dp=0: what ep leaves, here none
        with pytest.raises(LinglabError, match=message):
            init_parallel(ParallelConfig(dp=dp, ep=ep), torch.device("cpu"))
    cfg = _config(tokenizer, 1, "--train.batch_size=6")  # 6 rows do not split into 2 micro-batches x 2 ranks
    with pytest.raises(LinglabError, match="batch_size 6 does not split evenly into grad_accum 2 x 2 ranks"):
        build_trainer(cfg, RunDir(tokenizer.parent), None, build_model(cfg.model, seed=0),
                      dims=init_parallel(cfg.parallel, torch.device("cpu")))


def test_bad_layouts_are_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--out", out, *FAST, "--parallel.ep=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "parallel.ep (3) must divide model.num_experts (16)" in err
    assert main(["train", "--out", out, *FAST, "--parallel.dp=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs 2 ranks but this is a single process; launch it with torchrun" in err
    (tmp_path / "tokenizer.json").write_text("")
    run_on_ranks(functools.partial(_layout_errors, tokenizer=tmp_path / "tokenizer.json"), tmp_path)
