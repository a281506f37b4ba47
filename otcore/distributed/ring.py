"""Reductions over points spread around a ring of processes, as in ring attention.

Each rank holds one shard of the points being reduced over (the "travelling" tensors: points,
potential, weights, vectors, all indexed by point along dim 1) and one shard of the output side
(the "local" tensors). A reduction visits every rank's travelling shard in turn: the shards pass
around the ring (rank r receives from r - 1 and sends to r + 1, P - 1 shifts), and the transfer
of the next shard is posted before the current one is computed on, so communication overlaps
compute. Every block's result (B, n_local, ...) is combined into the output: a sum (plan
products) or a stable log-sum-exp (the softmin). ``Ring.reduce_scatter`` runs the other way
round: each rank has a contribution to every rank's shard, and accumulators travel around the
ring, each rank adding its part, until each reaches its owner.

Memory is O((n + m)/P) per rank in forward and backward alike: ``RingReduce`` saves only the
rank's own shards and output, and its backward passes the travelling shards around the ring once
more, recomputing each block under autograd, with the gradients of the travelling shards
accumulated on their way and sent home on a last shift (the backward of "receive from r - 1,
send to r + 1" is "send to r - 1, receive from r + 1", done as "the accumulators travel with
the shards"). Gradients follow the convention of ``collectives``: each rank's backward gives the
gradient of its own shards; every rank must run the same reductions and backward passes in the
same order, with the same ``requires_grad`` flags.

References:
    Liu, Zaharia, Abbeel, "Ring attention with blockwise transformers for near-infinite
    context", arXiv:2310.01889 (blocks passed around a ring, overlapped with compute, and
    recomputed in backward).
    Milakov, Gimelshein, "Online normalizer calculation for softmax", arXiv:1805.02867 (the
    streaming log-sum-exp).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

Tensors = Sequence[torch.Tensor | None]
#: tags of the two kinds of transfer that can be in flight together (gloo matches by tag)
_SHARD_TAG, _GRAD_TAG = 0, 64


class Ring:
    """The ranks of ``group`` as a ring; ``sizes[j]``: the number of points rank j holds on the
    travelling side (every travelling tensor of rank j has ``sizes[j]`` entries along dim 1)."""

    def __init__(self, group, sizes: Sequence[int]):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        whole = cast(dist.ProcessGroup, group if group is not None else dist.group.WORLD)
        self.group, self.sizes, self.world, self.rank = group, list(sizes), world, rank
        self._right = dist.get_global_rank(whole, (rank + 1) % world)
        self._left = dist.get_global_rank(whole, (rank - 1) % world)

    def source(self, step: int) -> int:
        """The rank whose shard this rank holds after ``step`` shifts."""
        return (self.rank - step) % self.world

    def shift(self, tensors: Tensors, source: int, tag: int) -> Callable[[], list[torch.Tensor | None]]:
        """Post: send ``tensors`` to the right neighbour, receive the same tensors of rank
        ``source``'s size from the left (None entries are not sent). Returns the wait, which
        gives the received tensors."""
        ops: list[dist.P2POp] = []
        received: list[torch.Tensor | None] = []
        for k, t in enumerate(tensors):
            if t is None:
                received.append(None)
                continue
            sent = t.contiguous()
            buf = sent.new_empty((sent.shape[0], self.sizes[source], *sent.shape[2:]))
            ops += [dist.P2POp(dist.isend, sent, self._right, self.group, tag + k),
                    dist.P2POp(dist.irecv, buf, self._left, self.group, tag + k)]
            received.append(buf)
        works = dist.batch_isend_irecv(ops) if ops else []

        def wait() -> list[torch.Tensor | None]:
            for work in works:
                work.wait()
            ops.clear()  # the sent tensors are held until their transfers are complete
            return received

        return wait

    def blocks(self, tensors: Tensors, tag: int = _SHARD_TAG) -> Iterator[list[torch.Tensor | None]]:
        """Every rank's shard of ``tensors``, this rank's first; the transfer of the next one is
        posted before the current one is yielded (consume the whole iterator)."""
        current = list(tensors)
        for step in range(self.world):
            pending = self.shift(current, self.source(step + 1), tag) if step < self.world - 1 else None
            yield current
            if pending is not None:
                current = pending()

    def reduce_scatter(self, part: Callable[[int], torch.Tensor], tag: int = _SHARD_TAG) -> torch.Tensor:
        """``sum_r part_r(self.rank)``: every rank's contribution to this rank's shard, where
        ``part(j)`` is this rank's contribution to rank j's (B, ``sizes[j]``, ...).

        The accumulator of rank j starts at rank j + 1 and travels right, each rank adding its
        part, and reaches j after P - 1 shifts (a ring reduce-scatter: one shard's worth of
        data per shift). Each part is computed while the accumulator it joins is in flight."""
        total = part(self.source(1))
        for step in range(1, self.world):
            # what arrives next belongs to rank - step - 1 (sized as its shard)
            pending = self.shift([total], self.source(step + 1), tag)
            mine = part(self.source(step + 1))
            total = cast(torch.Tensor, pending()[0]) + mine
        return total


@dataclass(frozen=True)
class RingOp:
    """One reduction around the ring.

    ``block(local, travelling)`` is one block's result (B, n_local, ...), differentiable in both
    lists; ``n_local`` is how many of the tensors given to ``ring_reduce`` are local.
    ``softmin_eps``: None to sum the blocks, else eps for ``-eps log sum_blocks exp(-block/eps)``
    (blocks that are softmins at eps combine into the softmin over every rank's points).
    """

    ring: Ring
    block: Callable[[Tensors, Tensors], torch.Tensor]
    n_local: int
    softmin_eps: float | None = None

    def combine(self, out: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
        if out is None:
            return part
        if self.softmin_eps is None:
            return out + part
        eps = self.softmin_eps
        return -eps * torch.logaddexp(out / -eps, part / -eps)

    def block_grad(self, grad: torch.Tensor, out: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """The cotangent of one block given that of the output: d out / d part = 1 (sum) or the
        softmax weight exp((out - part)/eps) (0 where the block has no mass)."""
        if self.softmin_eps is None:
            return grad
        share = torch.exp((out - part) / self.softmin_eps)
        return grad * torch.where(torch.isfinite(part), share, 0.0)


class _RingReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op: RingOp, *tensors):
        local, own = tensors[: op.n_local], tensors[op.n_local:]
        out = None
        for shard in op.ring.blocks(own):
            out = op.combine(out, op.block(local, shard))
        ctx.op = op
        ctx.save_for_backward(out, *tensors)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        op = ctx.op
        out, *tensors = ctx.saved_tensors
        wants = ctx.needs_input_grad[1:]
        n_local, ring = op.n_local, op.ring
        local, own = tensors[:n_local], tensors[n_local:]
        local_grads = [None] * n_local
        travelling = any(wants[n_local:])
        acc = [torch.zeros_like(t) if w else None for t, w in zip(own, wants[n_local:], strict=True)]
        pending = None
        for step, shard in enumerate(ring.blocks(own)):
            with torch.enable_grad():
                leaves = [None if t is None else t.detach().requires_grad_(w)
                          for t, w in zip([*local, *shard], wants, strict=True)]
                part = op.block(leaves[:n_local], leaves[n_local:])
                wanted = [t for t in leaves if t is not None and t.requires_grad]
                grads = iter(torch.autograd.grad(part, wanted, op.block_grad(grad, out, part.detach()),
                                                 allow_unused=True))
            got = [next(grads) if t is not None and t.requires_grad else None for t in leaves]
            for k in range(n_local):
                if got[k] is not None:
                    local_grads[k] = got[k] if local_grads[k] is None else local_grads[k] + got[k]
            if not travelling:
                continue
            if pending is not None:  # the accumulators of this shard, from the left neighbour
                acc = pending()
            acc = [a if g is None or a is None else a + g for a, g in zip(acc, got[n_local:], strict=True)]
            # on to the next holder; after the last step the accumulators reach their owner
            pending = ring.shift(acc, ring.source(step + 1), _GRAD_TAG) if ring.world > 1 else None
        home = pending() if pending is not None else acc
        return (None, *local_grads, *[h if w else None for h, w in zip(home, wants[n_local:], strict=True)])


def ring_reduce(op: RingOp, local: Tensors, travelling: Tensors) -> torch.Tensor:
    """``op``'s reduction of this rank's ``local`` tensors against every rank's ``travelling``
    tensors (B, n_local, ...); differentiable once, in every tensor (module docstring)."""
    return _RingReduce.apply(op, *local, *travelling)
