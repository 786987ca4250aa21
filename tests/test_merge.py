"""WSM merging (SPEC §2): decay <-> merge weights, merge == decayed updates, checkpoint merge end to end."""

import pytest
import torch
from conftest import tiny_config

from linglab.checkpoint import from_pretrained, load_hf_tensors, save_pretrained
from linglab.errors import LinglabError
from linglab.merge import (
    decay_from_merge_weights,
    decay_schedule,
    merge_checkpoints,
    merge_state_dicts,
    merge_weights_from_decay,
)
from linglab.model import build_model
from linglab.tokenizer import Tokenizer


@pytest.mark.parametrize("kind", ["linear", "cosine", "sqrt"])
@pytest.mark.parametrize("k", [0, 1, 5, 32])
def test_decay_and_merge_weights_round_trip(kind, k):
    w = decay_schedule(kind, k)
    assert len(w) == k and all(0 < x < 1 for x in w) and w == sorted(w, reverse=True)
    c = merge_weights_from_decay(w)
    assert len(c) == k + 1 and min(c) >= 0 and sum(c) == pytest.approx(1.0)
    assert decay_from_merge_weights(c) == pytest.approx(w)
    assert merge_weights_from_decay(decay_from_merge_weights(c)) == pytest.approx(c)


def test_spec_formulas():
    assert merge_weights_from_decay([0.9, 0.5, 0.2]) == pytest.approx([0.1, 0.4, 0.3, 0.2])
    assert decay_from_merge_weights([0.1, 0.4, 0.3, 0.2]) == pytest.approx([0.9, 0.5, 0.2])
    assert merge_weights_from_decay([]) == [1.0]
    assert merge_weights_from_decay([1.0, 1.0]) == [0.0, 0.0, 1.0]  # no decay: the last checkpoint


@pytest.mark.parametrize("k", [1, 4, 31])
def test_plain_mean_is_the_linear_decay(k):
    assert merge_weights_from_decay(decay_schedule("linear", k)) == pytest.approx([1 / (k + 1)] * (k + 1))
    assert decay_from_merge_weights([1 / (k + 1)] * (k + 1)) == pytest.approx(decay_schedule("linear", k))


def sgd_on_quadratic(a, x, lr, steps, noise=None):
    """Iterates x_0..x_steps of x <- x - lr_i * (A x + noise_i) on f(x) = x^T diag(a) x / 2."""
    lrs = lr if isinstance(lr, list) else [lr] * steps
    xs = [x]
    for i in range(steps):
        g = a * x + (noise[i] if noise is not None else 0.0)
        x = x - lrs[i] * g
        xs.append(x)
    return xs


A = torch.tensor([1.0, 0.5, 0.2, 0.05], dtype=torch.float64)
X0 = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)


@pytest.mark.parametrize("kind", ["linear", "cosine", "sqrt"])
@pytest.mark.parametrize("noisy", [False, True])
def test_merge_equals_decay_applied_to_the_same_updates(kind, noisy):
    n, k, lr = 20, 8, 0.1
    noise = torch.randn(n + k, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) if noisy else None
    thetas = sgd_on_quadratic(A, X0, lr, n + k, noise)[n:]  # theta_0..theta_k: the last k steps at constant LR
    w = decay_schedule(kind, k)
    merged = merge_state_dicts([{"x": t} for t in thetas], merge_weights_from_decay(w))["x"]
    deltas = [thetas[i] - thetas[i - 1] for i in range(1, k + 1)]
    closed_form = thetas[0] + sum(wi * d for wi, d in zip(w, deltas, strict=True))
    torch.testing.assert_close(merged, closed_form, rtol=1e-12, atol=1e-12)


def test_merge_approximates_a_real_decayed_run_at_small_lr():
    """A decayed run takes different updates (the gradient moves), but only at second order in the LR."""
    n, k = 10, 8
    w = decay_schedule("cosine", k)
    errors = []
    for lr in (1e-2, 1e-3):
        start = sgd_on_quadratic(A, X0, lr, n)[-1]
        thetas = sgd_on_quadratic(A, start, lr, k)
        merged = merge_state_dicts([{"x": t} for t in thetas], merge_weights_from_decay(w))["x"]
        decayed = sgd_on_quadratic(A, start, [lr * wi for wi in w], k)[-1]
        errors.append((merged - decayed).norm().item())
        # Much closer to the decayed run than the constant-LR endpoint is (that gap is first order).
        assert errors[-1] < 0.1 * (thetas[-1] - decayed).norm().item()
    assert errors[1] < errors[0] / 50  # an LR 10x smaller: error ~100x smaller


def test_merge_keeps_dtypes_and_takes_non_float_tensors_from_the_last():
    sds = [{"w": torch.full((3,), v, dtype=torch.bfloat16), "step": torch.tensor(10 * v)} for v in (1, 2, 4)]
    out = merge_state_dicts(sds, [0.25, 0.25, 0.5])
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], torch.full((3,), 2.75, dtype=torch.bfloat16))
    assert torch.equal(out["step"], torch.tensor(40))


@pytest.mark.parametrize("decay, message", [
    ([0.5, 0.8], "non-increasing"),
    ([1.2], r"outside \[0, 1\]"),
    ([0.5, -0.1], r"outside \[0, 1\]"),
    ([float("nan")], r"outside \[0, 1\]"),
])
def test_bad_decay(decay, message):
    with pytest.raises(LinglabError, match=message):
        merge_weights_from_decay(decay)


@pytest.mark.parametrize("weights, message", [
    ([0.5, 0.6], "sum to 1"),
    ([1.5, -0.5], ">= 0"),
    ([], "no merge weights"),
])
def test_bad_merge_weights(weights, message):
    with pytest.raises(LinglabError, match=message):
        decay_from_merge_weights(weights)


def test_bad_decay_kind_and_k():
    with pytest.raises(LinglabError, match="unknown decay 'exp'"):
        decay_schedule("exp", 4)
    with pytest.raises(LinglabError, match=">= 0"):
        decay_schedule("linear", -1)


def test_mismatched_state_dicts():
    a = {"x": torch.zeros(3), "y": torch.zeros(2)}
    with pytest.raises(LinglabError, match=r"state dict 1: x has shape \(4,\), expected \(3,\)"):
        merge_state_dicts([a, {"x": torch.zeros(4), "y": torch.zeros(2)}], [0.5, 0.5])
    with pytest.raises(LinglabError, match="state dict 1 has no tensor y"):
        merge_state_dicts([a, {"x": torch.zeros(3)}], [0.5, 0.5])
    with pytest.raises(LinglabError, match="extra tensor z"):
        merge_state_dicts([a, {**a, "z": torch.zeros(1)}], [0.5, 0.5])
    with pytest.raises(LinglabError, match="dtype"):
        merge_state_dicts([a, {"x": torch.zeros(3, dtype=torch.float64), "y": torch.zeros(2)}], [0.5, 0.5])
    with pytest.raises(LinglabError, match="2 merge weights for 3 checkpoints"):
        merge_state_dicts([a, a, a], [0.5, 0.5])


def one_layer_checkpoint(path, seed, **overrides):
    model = build_model(tiny_config(num_hidden_layers=1, **overrides).model, seed=seed)
    with torch.no_grad():  # the MTP layer's router bias: a buffer, merged like the weights
        model.model.mtp_layers[0].mlp.gate.expert_bias.normal_()
    save_pretrained(model, path)
    return path


def test_merge_checkpoints_end_to_end(tmp_path):
    dirs = [one_layer_checkpoint(tmp_path / f"ckpt{s}", seed=s) for s in range(3)]
    tok = Tokenizer.train(["12+34=?\nanswer: 46"], vocab_size=260)
    tok.save(dirs[-1])
    c = merge_weights_from_decay(decay_schedule("cosine", 2))
    merge_checkpoints(dirs, c, tmp_path / "merged")

    inputs = [load_hf_tensors(d) for d in dirs]
    merged = load_hf_tensors(tmp_path / "merged")
    assert merged.keys() == inputs[0].keys()
    assert any(name.endswith("expert_bias") for name in merged)
    for name, t in merged.items():
        expected = sum(cj * sd[name].double() for cj, sd in zip(c, inputs, strict=True)).to(t.dtype)
        torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-9)  # last bit: summation order
    assert (tmp_path / "merged" / "config.json").read_bytes() == (dirs[0] / "config.json").read_bytes()
    assert Tokenizer.from_file(tmp_path / "merged").encode("46") == tok.encode("46")
    from_pretrained(tmp_path / "merged")  # a normal checkpoint


def test_merge_checkpoints_rejects_different_configs(tmp_path):
    a = one_layer_checkpoint(tmp_path / "a", seed=0)
    b = one_layer_checkpoint(tmp_path / "b", seed=1, rope_theta=20000.0)
    with pytest.raises(LinglabError, match="differs .* at 'rope_theta'"):
        merge_checkpoints([a, b], [0.5, 0.5], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(LinglabError, match="not found"):
        merge_checkpoints([a, tmp_path / "missing"], [0.5, 0.5], tmp_path / "out")
