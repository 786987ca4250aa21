"""Router and grouped MoE against plain references written from SPEC §1.4."""

import torch
from conftest import tiny_config
from moe_loop import moe_loop_forward
from reference_bailing import router_ref

from linglab.moe import MoE, group_limited_topk, max_violation, route, router_z_loss, update_expert_bias


def _moe(**overrides):
    cfg = tiny_config(**overrides).model
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    return moe


def test_router_equals_plain_reference_with_bias():
    moe = _moe(num_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    with torch.no_grad():
        moe.gate.expert_bias.normal_(0, 0.3)
    x = torch.randn(64, moe.cfg.hidden_size)
    weights, idx, _ = moe.gate(x)
    cfg = {k: getattr(moe.cfg, k) for k in ("num_experts", "n_group", "topk_group", "num_experts_per_tok",
                                             "routed_scaling_factor")}
    for t in range(64):
        chosen, w = router_ref(x[t], moe.gate.weight, moe.gate.expert_bias, cfg)
        order = idx[t].tolist()
        assert order == chosen
        assert torch.allclose(weights[t], w, atol=1e-6)


def test_group_masking_excludes_experts_outside_the_best_groups():
    # 4 groups of 2. Expert 0 is the single best expert, but its group (0, 1) sums lower than groups 1 and 2.
    s = torch.tensor([[0.95, 0.0, 0.6, 0.6, 0.5, 0.5, 0.1, 0.1]])
    idx = group_limited_topk(s, n_group=4, topk_group=2, top_k=2)
    assert sorted(idx[0].tolist()) == [2, 3]
    idx = group_limited_topk(s, n_group=4, topk_group=3, top_k=2)
    assert sorted(idx[0].tolist()) == [0, 2] or sorted(idx[0].tolist()) == [0, 3]


def test_bias_changes_selection_but_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    no_bias = torch.zeros(4)
    w0, i0 = route(logits, no_bias, n_group=1, topk_group=1, top_k=2, routed_scaling_factor=2.5)
    assert i0[0].tolist() == [0, 1]
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])  # pushes expert 3 into the selection
    w1, i1 = route(logits, bias, n_group=1, topk_group=1, top_k=2, routed_scaling_factor=2.5)
    assert sorted(i1[0].tolist()) == [0, 3]
    s = torch.sigmoid(logits[0])
    expected = torch.stack([s[e] for e in i1[0]]) / (s[0] + s[3]) * 2.5  # unbiased scores, normalised
    assert torch.allclose(w1[0], expected)
    assert torch.allclose(w0.sum(), torch.tensor(2.5)) and torch.allclose(w1.sum(), torch.tensor(2.5))


def test_grouped_moe_equals_per_expert_loop_forward_and_grads():
    moe = _moe(num_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    x = torch.randn(2, 37, moe.cfg.hidden_size, requires_grad=True)
    g = torch.randn_like(x)

    y, _ = moe(x)
    (y * g).sum().backward()
    grads = [p.grad.clone() for p in moe.parameters()] + [x.grad.clone()]
    moe.zero_grad()
    x.grad = None

    y_ref = moe_loop_forward(moe, x.view(-1, x.shape[-1])).view_as(x)
    (y_ref * g).sum().backward()
    grads_ref = [p.grad for p in moe.parameters()] + [x.grad]
    assert torch.allclose(y, y_ref, atol=1e-5)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-4)


def test_tokens_per_expert_counts_every_routed_token_in_training():
    moe = _moe().train()
    moe(torch.randn(50, moe.cfg.hidden_size))
    assert moe.tokens_per_expert.sum().item() == 50 * moe.cfg.num_experts_per_tok
    moe.eval()
    moe(torch.randn(10, moe.cfg.hidden_size))
    assert moe.tokens_per_expert.sum().item() == 50 * moe.cfg.num_experts_per_tok


def test_bias_update_moves_skewed_load_toward_balance():
    moe = _moe(num_experts=8, n_group=2, topk_group=2, num_experts_per_tok=2).train()
    x = torch.randn(512, moe.cfg.hidden_size)
    x[:, 0] = 1.0
    with torch.no_grad():  # every token's scores are skewed toward experts 0 and 1 through channel 0
        moe.gate.weight.normal_(0, 0.05)
        moe.gate.weight[:2, 0] = 3.0
    vios = []
    for _ in range(300):
        moe.tokens_per_expert.zero_()
        moe(x)
        load = moe.tokens_per_expert.clone()
        vios.append(max_violation(load))
        update_expert_bias(moe.gate.expert_bias, load, rate=1e-2)
    assert vios[0] > 2.0
    assert vios[-1] < 0.5 * vios[0]
    assert abs(moe.gate.expert_bias.mean().item()) < 1e-5  # zero-mean update


def test_bias_update_formula_and_maxvio():
    bias = torch.zeros(4)
    update_expert_bias(bias, torch.tensor([10.0, 0.0, 5.0, 5.0]), rate=0.1)
    sign = torch.tensor([-1.0, 1.0, 0.0, 0.0])
    assert torch.allclose(bias, 0.1 * (sign - sign.mean()))
    assert max_violation(torch.tensor([10.0, 0.0, 5.0, 5.0])) == 1.0
    assert max_violation(torch.tensor([3.0, 3.0])) == 0.0


def test_router_z_loss_is_returned_in_training_only():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]])
    by_hand = sum(torch.log(row.exp().sum()) ** 2 for row in logits) / 2  # mean over tokens of logsumexp^2
    assert torch.allclose(router_z_loss(logits, 0.5), 0.5 * by_hand)

    moe = _moe(router_z_loss_coef=1e-2).train()
    x = torch.randn(30, moe.cfg.hidden_size)
    y, z = moe(x)
    assert torch.equal(z, router_z_loss(moe.gate(x)[2], 1e-2)) and z.requires_grad
    assert moe.eval()(x)[1] is None
    assert _moe().train()(x)[1] is None  # router_z_loss_coef 0: no z-loss
