"""FSDP2 and expert parallelism on 2 gloo CPU processes, against the single-process model (SPEC §1.4, §7).

Every rank also computes the single-process reference itself (same seed, full batch), so each compares
its own shard of the result without shipping tensors back to the test process.
"""

import copy

import torch
import torch.distributed as dist
from conftest import tiny_config
from dist_utils import requires_gloo, run_on_ranks
from torch.distributed.device_mesh import init_device_mesh

from linglab.fp8 import Fp8Recipe
from linglab.fp8_convert import Fp8GroupedExperts, convert_to_fp8
from linglab.model import build_model
from linglab.moe import MoE, update_expert_bias
from linglab.parallel.expert_parallel import (
    EXPERT_PARAMS,
    ExpertParallelExperts,
    apply_expert_parallel,
    gather_expert_weights,
    shard_expert_weights,
)
from linglab.parallel.fsdp import all_reduce_expert_loads, apply_fsdp
from linglab.train import make_optimizer

pytestmark = requires_gloo

ATOL = 1e-5


def _batch(cfg, batch_size=4, seq_len=16):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch_size, seq_len + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _assert_close(actual, expected, what):
    diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert diff <= ATOL, f"{what}: max abs diff {diff:.3g} > {ATOL} (reference scale {expected.abs().max().item():.3g})"


# ---------------------------------------------------------------- FSDP2


def _fsdp_matches_full_batch(rank, world_size):
    cfg = tiny_config(initializer_range=0.02)
    inputs, targets = _batch(cfg)
    ref = build_model(cfg.model, seed=0).train()
    ref(inputs, targets=targets).loss.backward()
    ref_params = dict(ref.named_parameters())

    model = apply_fsdp(build_model(cfg.model, seed=0).train(), init_device_mesh("cpu", (world_size,)))
    optimizer = make_optimizer(model, cfg.train)
    # Equal halves and a per-rank mean loss: FSDP2's averaging reduce-scatter gives the full-batch mean's gradient.
    model(inputs.chunk(world_size)[rank], targets=targets.chunk(world_size)[rank]).loss.backward()
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor()
        _assert_close(grad, ref_params[name].grad, f"grad {name}")
        # AdamW's first step is ~lr * sign(g): it would blow the ~1e-9 roundoff of near-zero gradients up to ~lr,
        # so the reference steps from the same gradients and the test checks the optimizer on sharded parameters.
        ref_params[name].grad = grad
    optimizer.step()
    make_optimizer(ref, cfg.train).step()
    for name, p in model.named_parameters():
        _assert_close(p.detach().full_tensor(), ref_params[name].detach(), f"weight {name} after one AdamW step")


def test_fsdp2_gradients_and_step_equal_single_process_full_batch(tmp_path):
    run_on_ranks(_fsdp_matches_full_batch, tmp_path)


def _expert_loads_all_reduced(rank, world_size):
    cfg = tiny_config()
    inputs, targets = _batch(cfg, batch_size=8)
    ref = build_model(cfg.model, seed=0).train()
    ref(inputs, targets=targets)
    for m in ref.moe_layers():
        update_expert_bias(m.gate.expert_bias, m.tokens_per_expert, cfg.train.bias_update_rate)

    model = apply_fsdp(build_model(cfg.model, seed=0).train(), init_device_mesh("cpu", (world_size,)))
    model(inputs.chunk(world_size)[rank], targets=targets.chunk(world_size)[rank])
    local = [m.tokens_per_expert.clone() for m in model.moe_layers()]
    all_reduce_expert_loads(model)
    for m, ref_m, local_load in zip(model.moe_layers(), ref.moe_layers(), local):
        assert not torch.equal(local_load, ref_m.tokens_per_expert), "the test batch should give each rank its own loads"
        assert torch.equal(m.tokens_per_expert, ref_m.tokens_per_expert)
        update_expert_bias(m.gate.expert_bias, m.tokens_per_expert, cfg.train.bias_update_rate)
        biases = [torch.empty_like(m.gate.expert_bias) for _ in range(world_size)]
        dist.all_gather(biases, m.gate.expert_bias)
        assert all(torch.equal(b, biases[0]) for b in biases), "expert biases differ across ranks"
        assert torch.equal(m.gate.expert_bias, ref_m.gate.expert_bias)
        assert m.gate.expert_bias.abs().sum() > 0


def test_dp_expert_load_all_reduce_gives_the_full_batch_bias_update(tmp_path):
    run_on_ranks(_expert_loads_all_reduced, tmp_path)


# ---------------------------------------------------------------- expert parallelism

# (name, expert-bias overrides): the bias steers selection, so it can starve experts deterministically.
# With 16 experts over 2 ranks, rank 1 owns experts 8..15, i.e. groups 2 and 3 of the 4 groups of 4.
EP_CASES = [
    ("natural routing", {}),
    ("expert 3 and 12 get no tokens", {3: -10.0, 12: -10.0}),
    ("rank 1 receives no tokens at all", {e: -10.0 for e in range(8, 16)}),
]


def _ep_case(rank, world_size, name, bias, group, fp8=False):
    cfg = tiny_config().model
    torch.manual_seed(0)
    moe = MoE(cfg).train()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)  # spread router logits, O(1) outputs and gradients
        for e, b in bias.items():
            moe.gate.expert_bias[e] = b
    if fp8:  # converted before sharding, as the trainer does: each rank runs the FP8 GEMMs on its experts
        convert_to_fp8(moe, Fp8Recipe(), "emulate")
    sizes = [13, 7]  # uneven token counts per rank
    x_full = torch.randn(sum(sizes), cfg.hidden_size)
    g_full = torch.randn(sum(sizes), cfg.hidden_size)  # upstream gradient: loss = sum(y * g) over ALL ranks' tokens
    lo = sum(sizes[:rank])
    mine = slice(lo, lo + sizes[rank])

    ref = copy.deepcopy(moe)
    x_ref = x_full.clone().requires_grad_()
    y_ref, _ = ref(x_ref)
    (y_ref * g_full).sum().backward()

    ep = apply_expert_parallel(copy.deepcopy(moe), group)
    assert isinstance(ep.experts, ExpertParallelExperts) and isinstance(ep.experts, Fp8GroupedExperts) == fp8
    x = x_full[mine].clone().requires_grad_()
    y, _ = ep(x)
    (y * g_full[mine]).sum().backward()

    _assert_close(y, y_ref[mine].detach(), f"{name}: output")
    _assert_close(x.grad, x_ref.grad[mine], f"{name}: input gradient")
    # A rank's experts see the tokens of every rank routed to them, so their gradients are the full batch's slice.
    local = cfg.num_experts // world_size
    experts = slice(rank * local, (rank + 1) * local)
    for pname in ("gate_up_proj", "down_proj"):
        grad = getattr(ep.experts, pname).grad
        _assert_close(grad, getattr(ref.experts, pname).grad[experts], f"{name}: expert {pname} gradient")
    # The replicated router and shared expert saw only this rank's tokens: their gradients sum to the reference.
    # Not the FP8 shared expert's: its wgrad quantises x^T and dy^T in 1x128 tiles along this rank's tokens only.
    for (pname, p), ref_p in zip(ep.named_parameters(), ref.parameters()):
        if not pname.startswith("experts.") and not (fp8 and pname.startswith("shared_experts.")):
            summed = p.grad.clone()
            dist.all_reduce(summed, group=group)
            _assert_close(summed, ref_p.grad, f"{name}: summed {pname} gradient")
    loads = ep.tokens_per_expert.clone()
    dist.all_reduce(loads, group=group)
    assert torch.equal(loads, ref.tokens_per_expert), f"{name}: global loads"
    starved = [e for e in bias if ref.tokens_per_expert[e] != 0]
    assert not starved, f"{name}: experts {starved} still received tokens"


def _expert_parallel_matches_single_device(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    for name, bias in EP_CASES:
        _ep_case(rank, world_size, name, bias, group)
    _ep_case(rank, world_size, "fp8", {}, group, fp8=True)


def test_expert_parallel_moe_equals_single_device_including_starved_experts_ranks_and_fp8(tmp_path):
    run_on_ranks(_expert_parallel_matches_single_device, tmp_path)


def _expert_parallel_model(rank, world_size):
    cfg = tiny_config(initializer_range=0.02)
    inputs, targets = _batch(cfg, batch_size=2 * world_size)
    full = build_model(cfg.model, seed=0).train()
    full_state = {k: v.clone() for k, v in full.state_dict().items()}

    sharded = shard_expert_weights(full_state, rank, world_size)
    sliced = apply_expert_parallel(build_model(cfg.model, seed=0)).state_dict()
    assert sliced.keys() == sharded.keys() and all(torch.equal(t, sharded[k]) for k, t in sliced.items())

    model = apply_expert_parallel(build_model(cfg.model, seed=1).train())  # other weights until the checkpoint loads
    experts = [m.experts for m in model.modules() if isinstance(m, MoE)]
    assert len(experts) == cfg.model.num_hidden_layers - cfg.model.first_k_dense_replace + 1  # main stack + MTP
    assert all(e.gate_up_proj.shape[0] == cfg.model.num_experts // world_size for e in experts)
    model.load_state_dict(sharded)
    gathered = gather_expert_weights(model.state_dict())
    assert gathered.keys() == full_state.keys() and all(torch.equal(t, full_state[k]) for k, t in gathered.items())

    halves = list(zip(inputs.chunk(world_size), targets.chunk(world_size)))
    mine_inputs, mine_targets = halves[rank]
    loss = model(mine_inputs, targets=mine_targets).loss
    ref_losses = [full(i, targets=t).loss for i, t in halves]
    _assert_close(loss.detach(), ref_losses[rank].detach(), "EP model loss on this rank's batch")
    # Every layer's all-to-all backward (MTP included) brings every rank's gradient to the expert's owner.
    loss.backward()
    sum(ref_losses).backward()
    ref_params = dict(full.named_parameters())
    for name, p in model.named_parameters():
        if name.endswith(EXPERT_PARAMS):
            _assert_close(p.grad, ref_params[name].grad.chunk(world_size)[rank], f"grad {name}")


def test_expert_parallel_model_loads_a_single_device_checkpoint_and_keeps_loss_and_expert_grads(tmp_path):
    run_on_ranks(_expert_parallel_model, tmp_path)
