"""The model against the plain SPEC §1 reference, and model-level behaviours (KV cache, MTP, RoPE)."""

import json

import pytest
import torch
from conftest import decode_in_parts, randomize, tiny_config
from reference_bailing import forward_ref

from linglab.checkpoint import hf_config_dict, to_hf_state_dict
from linglab.model import apply_partial_rope, build_model, rope_cos_sin


def _random_model(**overrides):
    cfg = tiny_config(num_hidden_layers=2, **overrides).model
    return randomize(build_model(cfg, seed=0))


@pytest.mark.parametrize("partial_rotary_factor", [0.5, 1.0])  # the released half-head RoPE, and tiny's full RoPE
def test_logits_match_plain_reference_from_hf_tensors(partial_rotary_factor):
    model = _random_model(partial_rotary_factor=partial_rotary_factor)
    sd = to_hf_state_dict(model)
    cfg = json.loads(json.dumps(hf_config_dict(model.cfg)))
    ids = torch.randint(0, model.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        out = model(ids[:, :-1], targets=ids[:, 1:])
    ref_logits, ref_mtp = forward_ref(ids[0, :-1].tolist(), sd, cfg)
    assert (out.logits[0] - ref_logits).abs().max() <= 1e-4
    # MTP at position i predicts t_{i+2} from H_i and Emb(t_{i+1}): the reference's MTP logits are its CE input.
    mtp_ce = torch.nn.functional.cross_entropy(ref_mtp, ids[0, 2:])
    assert torch.allclose(out.mtp_loss, mtp_ce, atol=1e-4)


def test_kv_cache_decoding_equals_full_forward():
    model = _random_model()
    decoded, full, _ = decode_in_parts(model, torch.randint(0, model.cfg.vocab_size, (3, 20)))
    assert torch.allclose(decoded, full, atol=1e-5)


def test_mtp_loss_present_and_weighted():
    model = build_model(tiny_config().model, seed=0).train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 17))
    out = model(ids[:, :-1], targets=ids[:, 1:])
    assert out.mtp_loss is not None and out.mtp_loss.requires_grad
    assert torch.allclose(out.loss, out.main_loss + 0.1 * out.mtp_loss)
    out.loss.backward()
    assert model.model.mtp_layers[0].eh_proj.weight.grad.abs().sum() > 0

    no_mtp = build_model(tiny_config(num_nextn_predict_layers=0).model, seed=0)
    out = no_mtp(ids[:, :-1], targets=ids[:, 1:])
    assert out.mtp_loss is None and torch.equal(out.loss, out.main_loss)


def test_router_z_loss_is_summed_over_every_router_when_enabled():
    model = build_model(tiny_config(router_z_loss_coef=1e-2).model, seed=0).train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9))
    logits = []  # each router's fp32 logits, the MTP layer's included
    for m in model.moe_layers():
        m.gate.register_forward_hook(lambda module, args, out: logits.append(out[2]))
    out = model(ids[:, :-1], targets=ids[:, 1:])
    assert len(logits) == len(model.moe_layers()) == 4  # 3 MoE layers of the main stack and MTP's
    by_hand = sum(1e-2 * (torch.log(x.exp().sum(-1)) ** 2).mean() for x in logits)
    assert out.z_loss > 0 and torch.allclose(out.z_loss, by_hand)
    assert torch.allclose(out.loss, out.main_loss + 0.1 * out.mtp_loss + out.z_loss)
    assert model.eval()(ids[:, :-1], targets=ids[:, 1:]).z_loss is None  # a training loss only


def test_partial_rope_rotates_only_rope_dim_and_is_relative():
    hd, rope_dim = 16, 8
    x = torch.randn(1, 5, 2, hd)
    cos, sin = rope_cos_sin(rope_dim, 10000.0, torch.arange(5))
    y = apply_partial_rope(x, cos, sin)
    assert torch.equal(y[..., rope_dim:], x[..., rope_dim:])
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    # Dot products of rotated q/k depend only on the position difference.
    q, k = torch.randn(hd), torch.randn(hd)
    def rot(v, pos):
        c, s = rope_cos_sin(rope_dim, 10000.0, torch.tensor([pos]))
        return apply_partial_rope(v.view(1, 1, 1, hd), c, s).flatten()
    assert torch.allclose(rot(q, 3) @ rot(k, 1), rot(q, 7) @ rot(k, 5), atol=1e-5)


def test_qk_norm_can_be_disabled():
    model = build_model(tiny_config(use_qk_norm=False).model, seed=0)
    assert not any("query_layernorm" in n for n, _ in model.named_parameters())
    model(torch.randint(0, 512, (1, 8)))
