"""`linglab train` under pipeline parallel (SPEC §7, issue 7): 2 gloo ranks against one process, and checkpoints
across layouts.

One 2-rank launch trains every pipeline run the module compares; the single-process runs happen in the test
process. All runs see the same global batches (batch 8 in 4 micro-batches of 2 rows) with a constant LR after
warmup (WSM), so a run stopped at step 3 and resumed to step 6 follows the uninterrupted schedule. The pipeline
runs use 4 micro-batches (`parallel.pp_microbatches=0` takes train.grad_accum=4), the single process
grad_accum=4: the same math by construction. A further launch checks that a non-finite step is skipped on every
pipeline rank, and pp with dp or ep (not built yet) is a one-line error.

Tolerance: 1e-5 relative on losses and gradient norms and 2e-5 on checkpoint tensors (expert biases included),
as in test_distributed_train; AdamW moments within 1e-4 relative. The stages run the single-process ops on the
same micro-batches; only the shared weights' gradients (embedding and lm_head, which MTP reads too) are summed
over copies in another order, and the gradient norm over ranks: ~1e-7 on the weights after 6 steps. One
exception, measured: an embedding element whose gradient is ~1e-9, below AdamW's eps (1e-8), where
m / (sqrt(v) + eps) turns that rounding into a 3.7e-5 move. So the shared weights get 3e-4 (a tenth of one
AdamW step at lr 3e-3) on at most 1e-4 of their elements, 2e-5 on the rest. Such a moved element shifts the
gradients that later steps compute from it, so the AdamW moments, of every tensor, may miss 1e-4 relative on the
same share of elements: measured on the hybrid run, 5 of the embedding's 65,536 elements, 2 of its first layer's
query_key_value and 1 of lm_head, at moments near 1e-7 off by ~2e-9. A copy counted twice in the norm, a copy
left unsynchronised or a bias updated off its rank moves whole steps (3e-3, the bias 1e-3).
"""

import functools
import shutil

import pytest
import torch
import torch.distributed as dist
from dist_utils import requires_gloo, run_on_ranks
from test_distributed_train import HYBRID, RTOL, WEIGHT_ATOL, _final_weights, _fit, _skip_peak_measurement, _train_rows

import linglab.train
from linglab.cli import main
from linglab.config import ParallelConfig, load_config
from linglab.data import build_data
from linglab.errors import LinglabError
from linglab.model import build_model
from linglab.parallel.parallel_dims import init_parallel
from linglab.run import RunDir
from linglab.train import build_trainer

pytestmark = requires_gloo

FAST = ["--model.num_hidden_layers=2", "--data.seq_len=32", "--data.num_documents=400", "--train.batch_size=8",
        "--train.grad_accum=4", "--train.warmup_steps=2", "--train.schedule=wsm", "--train.ckpt_every=3",
        "--train.eval_every=0", "--train.eval_problems=2", "--train.num_samples=1"]
SHARED = ("model.word_embeddings.weight", "lm_head.weight")
SHARED_ATOL, SHARED_OUTLIERS = 3e-4, 1e-4
PP_1F1B = ["--parallel.pp=2", "--parallel.pp_plan=uniform"]
PP_INTERLEAVED = ["--parallel.pp=2", "--parallel.pp_virtual=2"]  # the balanced plan


def _config(tokenizer, steps: int, *extra: str):
    return load_config("tiny", overrides=[*FAST, f"--data.tokenizer={tokenizer}", f"--train.max_steps={steps}", *extra])


def _pipeline_runs(rank, world_size, root, tokenizer):
    _skip_peak_measurement()
    trainer = _fit(_config(tokenizer, 6, *PP_1F1B), root / "pp2")
    full = trainer.full_model()  # rank 0: a single-device model of the gathered weights; the others wait
    assert (full is None) == (rank != 0)
    if full is not None:
        ref = _final_weights(root / "pp2")
        assert all(torch.equal(t, ref[name]) for name, t in full.state_dict().items() if name in ref)
    _fit(_config(tokenizer, 6, *PP_INTERLEAVED), root / "pp2-interleaved")
    _fit(_config(tokenizer, 6, *PP_INTERLEAVED, "--train.recompute=full"), root / "pp2-interleaved-recompute")
    _fit(_config(tokenizer, 3, *PP_INTERLEAVED), root / "pp2-to3")
    _fit(_config(tokenizer, 6, *HYBRID, *PP_INTERLEAVED), root / "hybrid-pp2-interleaved")
    if rank == 0:
        shutil.copytree(root / "single-to3", root / "single-resumed-on-pp2")
    dist.barrier()
    _fit(_config(tokenizer, 6, *PP_1F1B), root / "single-resumed-on-pp2", resume=True)
    for cfg, message in ((ParallelConfig(pp=2, dp=2), "pp=2 with dp=2 x ep=1 is not built yet"),
                         (ParallelConfig(pp=3), "pp=3 ranks, but 2 were started")):
        with pytest.raises(LinglabError, match=message):
            init_parallel(cfg, torch.device("cpu"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config("tiny", overrides=FAST)
    build_data(cfg.data, root, cfg.train.eval_problems)
    tokenizer = root / "tokenizer.json"
    real_peak = linglab.train.matmul_peak_flops
    _skip_peak_measurement()
    try:
        _fit(_config(tokenizer, 6), root / "single")
        _fit(_config(tokenizer, 3), root / "single-to3")
        _fit(_config(tokenizer, 6, *HYBRID), root / "hybrid-single")
        run_on_ranks(functools.partial(_pipeline_runs, root=root, tokenizer=tokenizer), root)
        shutil.copytree(root / "pp2-to3", root / "pp2-resumed-on-1")
        _fit(_config(tokenizer, 6), root / "pp2-resumed-on-1", resume=True)
    finally:
        linglab.train.matmul_peak_flops = real_peak
    return root


def _assert_same_run_within_tolerance(run, reference):
    rows, ref_rows = _train_rows(run), _train_rows(reference)
    assert [r["step"] for r in rows] == list(range(1, 7)), "each step is logged once, resumed or not"
    for row, ref in zip(rows, ref_rows):
        for key in ("loss", "main_loss", "mtp_loss", "grad_norm", "maxvio"):
            assert row[key] == pytest.approx(ref[key], rel=RTOL), f"{run.name} step {row['step']}: {key}"
        assert row["z_loss"] is None and row["tokens"] == ref["tokens"] and row["skipped"] is False
    weights, ref_weights = _final_weights(run), _final_weights(reference)
    assert weights.keys() == ref_weights.keys()
    for name, ref in ref_weights.items():
        diff = (weights[name] - ref).abs()
        if name in SHARED:
            outliers = (diff > WEIGHT_ATOL).float().mean().item()
            assert diff.max() <= SHARED_ATOL and outliers <= SHARED_OUTLIERS, \
                f"{run.name}: {name} differs by up to {diff.max():.3g} ({outliers:.2%} beyond {WEIGHT_ATOL})"
        else:
            assert diff.max() <= WEIGHT_ATOL, f"{run.name}: {name} differs by {diff.max():.3g} from {reference.name}"
    state, ref_state = (torch.load(r / "checkpoints" / "step_000006" / "train_state.pt", weights_only=False)
                        for r in (run, reference))
    assert state["loader"] == {"epoch": 0, "position": 6 * 8}
    optim, ref_optim = state["optimizer"], ref_state["optimizer"]
    assert optim["state"].keys() == ref_optim["state"].keys(), "the AdamW state holds each parameter once, by name"
    assert [g["params"] for g in optim["param_groups"]] == [g["params"] for g in ref_optim["param_groups"]]
    for name, per in ref_optim["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            close = torch.isclose(optim["state"][name][key], per[key], rtol=1e-4, atol=1e-9 if key == "exp_avg" else 1e-12)
            outliers = (~close).float().mean().item()
            assert outliers <= SHARED_OUTLIERS, f"{run.name}: {name} {key} misses 1e-4 relative on {outliers:.2%}"


@pytest.mark.parametrize("run", ["pp2", "pp2-interleaved"])
def test_pipeline_training_equals_the_single_process_run_with_as_many_micro_batches(runs, run):
    _assert_same_run_within_tolerance(runs / run, runs / "single")
    assert sorted(p.name for p in (runs / run / "checkpoints").iterdir()) == ["step_000003", "step_000006"]


def test_recompute_in_a_pipeline_changes_no_number(runs):
    """train.recompute=full in every stage of the interleaved pipeline: the run without recompute, bit for bit."""
    assert _train_rows(runs / "pp2-interleaved-recompute") == _train_rows(runs / "pp2-interleaved")
    ref = _final_weights(runs / "pp2-interleaved")
    assert all(torch.equal(t, ref[name]) for name, t in _final_weights(runs / "pp2-interleaved-recompute").items())


def test_hybrid_pipeline_training_equals_its_single_process_run(runs):
    """Stages hold the hybrid's layers by global index (SPEC §8); test_pipeline checks a 4-layer split at every step."""
    _assert_same_run_within_tolerance(runs / "hybrid-pp2-interleaved", runs / "hybrid-single")


@pytest.mark.parametrize("run", ["pp2-resumed-on-1", "single-resumed-on-pp2"])
def test_checkpoints_resume_across_pipeline_layouts(runs, run):
    _assert_same_run_within_tolerance(runs / run, runs / "single")


def test_pipeline_with_data_or_expert_parallel_is_a_one_line_error(tmp_path, capsys):
    out = str(tmp_path / "run")
    for flags, message in ((["--parallel.pp=2", "--parallel.ep=2"], "parallel.pp (2) with dp=0 x ep=2"),
                           (["--parallel.pp=2", "--parallel.dp=2"], "is not built yet"),
                           (["--parallel.pp=2"], "pp=2 needs 2 ranks but this is a single process"),
                           (["--parallel.pp=8"], "(4) must be >= pp (8) for 1F1B"),
                           (["--parallel.pp_plan=greedy"], "must be 'balanced' or 'uniform'")):
        assert main(["train", "--out", out, *FAST, *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def _non_finite_on_the_first_stage(rank, world_size, root, tokenizer):
    _skip_peak_measurement()
    cfg = _config(tokenizer, 3, *PP_1F1B)
    dims = init_parallel(cfg.parallel, torch.device("cpu"))
    dims.on_main(lambda: RunDir(root / "run").prepare(resume=False, overwrite=True))
    data = build_data(cfg.data, root / "run", cfg.train.eval_problems, save_tokenizer=dims.is_main)
    trainer = build_trainer(cfg, RunDir(root / "run"), data, build_model(cfg.model, seed=0), log=lambda *a: None, dims=dims)
    trainer.train_step()
    if rank == 0:  # the embedding's stage: rank 1, which holds the loss, gets a non-finite hidden state
        embedding = trainer.runner.modules[0].model.word_embeddings
        hook = embedding.register_forward_hook(lambda module, args, out: out * float("inf"))
    before = trainer.runner.gather()
    assert trainer.train_step()["skipped"], f"rank {rank} stepped"
    after = trainer.runner.gather()
    assert all(torch.equal(before[k], after[k]) for k in before), f"rank {rank}: weights or expert biases moved"
    if rank == 0:
        hook.remove()
    assert not trainer.train_step()["skipped"] and trainer.counters["skipped"] == 1


def test_a_non_finite_step_is_skipped_on_every_pipeline_rank(tmp_path, runs):
    run_on_ranks(functools.partial(_non_finite_on_the_first_stage, root=tmp_path, tokenizer=runs / "tokenizer.json"),
                 tmp_path)
