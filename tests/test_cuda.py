"""GPU checks: skipped where torch sees no CUDA device (CI), run on a lent GPU (`device` tool).

They check what the CPU tests cannot: real FP8 GEMMs through `torch._scaled_mm` with Ling's 1x128 / 128x128
scales (SPEC §3) against the emulation, that a training step on the GPU computes what it computes on the CPU, and
the bf16 path (`train.precision=bf16`, FP8 and recompute on top) that GPUs train with.
"""

import pytest
import torch
from conftest import tiny_config

from linglab.fp8 import Fp8Op, Fp8Recipe, _fp8_gemm, _scaled_gemm, fp8_linear, resolve_backend
from linglab.model import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _hopper() -> bool:
    return torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.parametrize("m,k,n", [(256, 256, 256), (150, 200, 136), (1000, 384, 72)])
@pytest.mark.parametrize("pairing", [("tile", "block"), ("tile", "tile")], ids=["act-x-weight", "grad-x-act"])
def test_scaled_mm_tilewise_equals_emulation(m, k, n, pairing):
    if not _hopper():
        pytest.skip("1x128 / 128x128 scaled_mm needs sm90+")
    a, bt = torch.randn(m, k, device="cuda"), torch.randn(n, k, device="cuda") * 3
    got = _scaled_gemm(a, pairing[0], bt, pairing[1], pow2=False)
    want = _fp8_gemm(a, pairing[0], bt, pairing[1], False, "emulate")
    assert got.shape == (m, n)
    assert _rel(got, want) < 1e-5  # same FP8 operands; only the fp32 accumulation order differs


def _scaled_mm_matches_emulation(batch: int, out_features: int, parts=None) -> None:
    """fp8_linear forward and both gradients on scaled_mm equal the emulation (fp32 accumulation order aside)."""
    x = torch.randn(batch, 100, 320, device="cuda", requires_grad=True)
    w = torch.randn(out_features, 320, device="cuda", requires_grad=True)
    dy = torch.randn(batch, 100, out_features, device="cuda")
    results = {}
    for backend in ("scaled_mm", "emulate"):
        x.grad = w.grad = None
        y = fp8_linear(x, w, op=Fp8Op(Fp8Recipe(), backend), parts=parts)
        y.backward(dy)
        results[backend] = (y.detach(), x.grad.clone(), w.grad.clone())
    for got, want in zip(results["scaled_mm"], results["emulate"]):
        assert _rel(got, want) < 1e-5


def test_auto_backend_takes_scaled_mm_on_hopper_and_fp8_linear_matches_emulation():
    if not _hopper():
        pytest.skip("needs sm90+")
    assert resolve_backend("auto", "cuda", Fp8Recipe()) == "scaled_mm"
    _scaled_mm_matches_emulation(4, 192)


def test_stacked_gate_up_on_scaled_mm_matches_emulation():
    """[gate; up] of width 72 each (not whole 128x128 blocks): scaled_mm runs one GEMM per stacked weight."""
    if not _hopper():
        pytest.skip("needs sm90+")
    _scaled_mm_matches_emulation(2, 144, parts=(72, 72))


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8-emulate"])
def test_training_step_on_cuda_matches_cpu(fp8):
    """Forward and backward of the tiny model on the GPU equal the CPU's to fp32 rounding (TF32 off)."""
    from linglab.train import apply_fp8

    cfg = tiny_config()
    cfg.fp8.enabled, cfg.fp8.backend = fp8, "emulate"
    ids = torch.randint(0, cfg.model.vocab_size, (4, 65))
    grads = {}
    for device in ("cpu", "cuda"):
        model = build_model(cfg.model, device=device, seed=0).train()
        apply_fp8(model, cfg.fp8)
        out = model(ids[:, :-1].to(device), targets=ids[:, 1:].to(device))
        out.loss.backward()
        grads[device] = (out.loss.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None})
    assert abs(float(grads["cuda"][0] - grads["cpu"][0])) < 1e-4 * float(grads["cpu"][0])
    assert grads["cuda"][1].keys() == grads["cpu"][1].keys()
    for name, g in grads["cpu"][1].items():
        # FP8 rounding can flip on a last-bit difference upstream, so the FP8 bound is looser.
        assert _rel(grads["cuda"][1][name], g) < (5e-2 if fp8 else 1e-3), name


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "bf16+fp8-emulate"])
def test_bf16_step_on_cuda_tracks_fp32_and_keeps_fp32_weights(fp8):
    """train.precision=bf16 on the GPU path: the loss within 1% of fp32's, gradients within bf16's rounding, the
    weights and their gradients fp32 (`linglab.precision`)."""
    from linglab.precision import compute_precision
    from linglab.train import apply_fp8

    cfg = tiny_config()
    cfg.fp8.enabled, cfg.fp8.backend = fp8, "emulate"
    ids = torch.randint(0, cfg.model.vocab_size, (4, 65), device="cuda")
    results = {}
    for precision in ("fp32", "bf16"):
        model = build_model(cfg.model, device="cuda", seed=0).train()
        apply_fp8(model, cfg.fp8)
        with compute_precision(precision, "cuda"):
            out = model(ids[:, :-1], targets=ids[:, 1:])
        out.loss.backward()
        assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
                   for p in model.parameters())
        results[precision] = (out.loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()
                                                          if p.grad is not None]))
    assert abs(results["bf16"][0] - results["fp32"][0]) < 1e-2 * results["fp32"][0]
    assert _rel(results["bf16"][1], results["fp32"][1]) < 5e-2


@pytest.mark.parametrize("extra", [[], ["--train.precision=bf16", "--train.recompute=full"]], ids=["fp32", "bf16"])
def test_train_command_runs_on_cuda_and_resumes(tmp_path, extra):
    from linglab.config import load_config
    from linglab.train import run_training

    over = ["--train.max_steps=6", "--train.ckpt_every=3", "--train.eval_every=0", "--train.eval_problems=2",
            "--train.num_samples=1", "--train.device=cuda", "--fp8.enabled=true", "--fp8.monitor_every=2",
            "--data.num_documents=300", *extra]
    cfg = load_config("tiny", overrides=over)
    run_training(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "final").is_dir()
    cfg.train.max_steps = 9
    run_training(cfg, tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "checkpoints" / "step_000009").is_dir()


def test_rl_runs_on_cuda_with_fp8_rollouts_and_c3po_and_resumes(tmp_path):
    from linglab.checkpoint import save_pretrained
    from linglab.config import load_config
    from linglab.model import build_model
    from linglab.rl.trainer import run_rl
    from linglab.tasks import iter_corpus_texts
    from linglab.tokenizer import Tokenizer

    tok = Tokenizer.train(iter_corpus_texts(300, seed=0), vocab_size=300)
    cfg = load_config("tiny", overrides=["--model.num_hidden_layers=2", f"--model.vocab_size={tok.vocab_size}"])
    save_pretrained(build_model(cfg.model, seed=0), tmp_path / "start")
    tok.save(tmp_path / "start" / "tokenizer.json")
    over = ["--train.device=cuda", "--rl.steps=2", "--rl.group_size=2", "--rl.c3po=true", "--rl.c3po_capacity=8",
            "--rl.c3po_budget=16", "--rl.max_new_tokens=8", "--rl.ckpt_every=1", "--rl.eval_problems=2",
            "--rl.eval_samples=2", "--rl.eval_ks=1,2", "--rl.rollout_precision=fp8"]
    run_rl(load_config("tiny", overrides=over), tmp_path / "start", tmp_path / "rl")
    run_rl(load_config("tiny", overrides=[*over, "--rl.steps=3"]), None, tmp_path / "rl", resume=True)
    assert (tmp_path / "rl" / "checkpoints" / "step_000003").is_dir()
