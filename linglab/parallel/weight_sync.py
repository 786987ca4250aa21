"""Weight exchange from the trainer to rollout ranks (SPEC §9, the Awex/AState step): the full weights broadcast
in buckets over a torch.distributed group, so a rollout rank's copy equals the trainer's bit for bit.

    sent = broadcast_weights(model.state_dict(), src=0, group=sync_group)   # trainer: bytes sent
    broadcast_weights(copy.state_dict(), src=0, group=sync_group)           # rollout rank: filled in place

Every rank holds a model of the same architecture, so the names, shapes and dtypes are known on both sides and
only the values travel. Tensors are packed, in name order, into flat buckets of one dtype of at most
`bucket_bytes` (a tensor larger than that is a bucket of its own): few large messages rather than one per
tensor, and a bounded staging buffer rather than a copy of the whole model. gloo on CPU, NCCL on GPU (the
tensors are on the rank's device).
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

BUCKET_BYTES = 64 << 20


def weight_buckets(names: list[str], state: dict[str, torch.Tensor], bucket_bytes: int) -> list[list[str]]:
    """Consecutive names of one dtype, at most `bucket_bytes` per bucket (an oversized tensor alone)."""
    buckets: list[list[str]] = []
    size = 0
    for name in names:
        t = state[name]
        nbytes = t.numel() * t.element_size()
        last = buckets[-1] if buckets else None
        if last is None or state[last[0]].dtype != t.dtype or size + nbytes > bucket_bytes:
            buckets.append([name])
            size = nbytes
        else:
            last.append(name)
            size += nbytes
    return buckets


@torch.no_grad()
def broadcast_weights(state: dict[str, torch.Tensor], src: int, group: dist.ProcessGroup | None = None,
                      bucket_bytes: int = BUCKET_BYTES) -> int:
    """Broadcast `state` from rank `src` to every rank of `group`, bucket by bucket; the receivers' tensors are
    overwritten in place (pass the live `model.state_dict()`). Returns the bytes of the weights."""
    names = sorted(state)  # the sender's full state and a receiver's state_dict() may list them in other orders
    sending = dist.get_rank() == src
    for bucket in weight_buckets(names, state, bucket_bytes):
        tensors = [state[n] for n in bucket]
        if sending:
            flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        else:
            flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
        dist.broadcast(flat, src=src, group=group)
        if not sending:
            for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
                t.copy_(part.view_as(t))
    return sum(t.numel() * t.element_size() for t in state.values())


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """BLAKE2b of every tensor's name and bytes, in name order: equal digests mean bitwise-equal weights."""
    digest = hashlib.blake2b(digest_size=16)
    for name, t in sorted(state.items()):
        digest.update(name.encode())
        digest.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
