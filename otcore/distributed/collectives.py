"""Differentiable collectives for sharded geometries, and the checks that precede them.

Every rank runs the same solver code on its own shard and computes the replicated quantities
(the column potential g, the dual value, the errors) identically. Gradients follow the
convention of tensor-parallel training (Shoeybi et al., "Megatron-LM", arXiv:1909.08053):

* ``all_reduce_sum``: a sum over the shards, replicated on every rank. Forward: all-reduce;
  backward: identity (the gradient of a replicated output is already the whole gradient on
  every rank, and d sum / d shard = 1).
* ``enter_shard``: a replicated tensor used by a computation on this rank's shard. Forward:
  identity; backward: all-reduce (each rank holds only its shard's part of the gradient).
* ``logsumexp_across``: ``log sum_ranks exp(L_r)`` of a per-rank log-sum-exp (B, m), stable
  (all-reduce MAX of the local maxima, then SUM of the shifted exponentials). Backward: the
  softmax weights ``exp(L_r - L)`` of this rank, with no communication.

``torch.distributed.all_reduce`` records no autograd, and ``torch.distributed.nn``'s backward
all-reduces the gradient of every output (which would count a replicated loss once per rank),
hence these functions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def check_group(group) -> None:
    """Raise ``ValueError`` (on every rank, without communicating) unless torch.distributed is
    initialised and this process belongs to ``group`` (None: the default group)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: torch.distributed is not initialised (call torch.distributed.init_process_group "
                         "first, e.g. by launching with torchrun)")
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group")


def gather_descriptors(values: list[int], device: torch.device, group) -> list[list[int]]:
    """Every rank's list of integers (same length on every rank), gathered on every rank."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return [t.tolist() for t in everyone]


def all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    """A reduced copy of ``t`` (no autograd)."""
    out = t.detach().clone()
    dist.all_reduce(out, op=op, group=group)
    return out


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        return all_reduce(t, dist.ReduceOp.SUM, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _EnterShard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, dist.ReduceOp.SUM, ctx.group), None


class _LogSumExpAcross(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lse, group):
        top = all_reduce(lse, dist.ReduceOp.MAX, group)
        top = torch.where(torch.isfinite(top), top, 0.0)  # no rank has mass there: the result is -inf
        total = all_reduce(torch.exp(lse - top), dist.ReduceOp.SUM, group)
        out = torch.log(total) + top
        ctx.save_for_backward(lse, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        lse, out = ctx.saved_tensors
        share = torch.where(torch.isfinite(lse), torch.exp(lse - out), 0.0)
        return grad * share, None


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Sum of ``t`` over the ranks of ``group``, on every rank; backward: identity (module docstring)."""
    return _AllReduceSum.apply(t, group)


def enter_shard(t: torch.Tensor | None, group) -> torch.Tensor | None:
    """``t`` (replicated), marked as used by this rank's shard: its gradient is all-reduced in
    backward. Returned as is when autograd records nothing on it (or ``t`` is None)."""
    if t is None or not (torch.is_grad_enabled() and t.requires_grad):
        return t
    return _EnterShard.apply(t, group)


def logsumexp_across(lse: torch.Tensor, group) -> torch.Tensor:
    """``log sum_r exp(lse_r)`` over the ranks of ``group`` (same shape as ``lse``), stable, on
    every rank; differentiable (backward: this rank's weights ``exp(lse_r - out)``)."""
    return _LogSumExpAcross.apply(lse, group)
