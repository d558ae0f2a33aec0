"""Data-parallel strategies of the trainer: DDP (every rank holds everything) or FSDP (FSDP2 ``fully_shard``: each
rank holds 1/N of every parameter, gradient and optimizer state, and gathers one decoder block at a time).

Checkpoints hold full (unsharded) tensors whatever the strategy, so a run saved by FSDP over N processes resumes
on one process, under DDP, or under FSDP over another N, and the other way round.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without distributed support
        return None
    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    dt = _dtensor_type()
    return dt is not None and isinstance(t, dt)


def shard_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device, world: int) -> None:
    """FSDP2 over ``world`` ranks: one unit per decoder block (all four mixers of a layer travel together, so a
    step gathers a layer once, whichever mixer its placement picked) and the root (embeddings, final norm, head).
    Parameters stay fp32 (autocast runs the matmuls in bf16, as under DDP), so both strategies compute alike."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU (a collective for a sharded one: every rank must call it, in the same order)."""
    t = t.detach()
    return (t.full_tensor() if is_sharded(t) else t).cpu()


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out like ``param``: this rank's shard when ``param`` is sharded (a collective)."""
    if not is_sharded(param):
        return value.to(param.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered (the same layout as an unsharded run)."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: full(v) for k, v in s.items()} for i, s in sorted(state["state"].items())}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimizer state, sharding each tensor like its parameter (``Optimizer.load_state_dict`` would
    only move it to the parameter's device)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(params) != sum(len(g["params"]) for g in state["param_groups"]):
        raise ValueError("the checkpoint's optimizer holds another number of parameters")
    shaped = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        shaped[i] = {k: like(v, p) if v.dim() > 0 else v for k, v in s.items()}
    optimizer.load_state_dict({**state, "state": shaped})
