"""The torch.distributed collectives of the sharded NeuralDB, bounded in time, with one clear
error when a rank has died or stopped answering.

Transport: the process group's. gloo moves CPU tensors (buffers on a GPU are staged through host
memory); NCCL moves CUDA tensors on the current device. Every collective waits at most
`timeout` (`Work.wait(timeout)`); a peer that died makes gloo fail at once ("connection closed by
peer"), one that hangs fails when the timeout passes. Either way every waiting rank raises
`RankFailureError`; the group is unusable afterwards (the job must be restarted), while every
shard file holds exactly the writes committed before (writes are SQLite transactions).
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Optional

import torch
import torch.distributed as dist


# one rank's tensor into a slice of one output each; the older name is deprecated in torch >= 2.10
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class RankFailureError(RuntimeError):
    """A collective of the sharded NeuralDB failed: a rank died, was killed or did not answer
    within the timeout. The message names this rank, the collective and the timeout."""


def as_timeout(timeout: float | datetime.timedelta | None) -> datetime.timedelta | None:
    """Seconds (a positive number) or a timedelta as a timedelta; None stays None (the group's own)."""
    if timeout is None or isinstance(timeout, datetime.timedelta):
        seconds = None if timeout is None else timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(f"timeout must be seconds, a datetime.timedelta or None, got {type(timeout).__name__}")
    if seconds is not None and not 0 < seconds < float("inf"):
        raise ValueError(f"timeout must be a positive, finite time, got {seconds} s")
    return None if seconds is None else datetime.timedelta(seconds=seconds)


@dataclasses.dataclass(frozen=True)
class Communicator:
    """This rank's view of a process group: rank, world size, the device collective buffers live
    on ("cpu" for gloo, the current CUDA device for NCCL) and the timeout of each collective."""

    group: Optional[dist.ProcessGroup]
    rank: int
    world_size: int
    device: torch.device
    timeout: Optional[datetime.timedelta]

    @classmethod
    def of(cls, group: Optional[dist.ProcessGroup] = None,
           timeout: float | datetime.timedelta | None = None) -> "Communicator":
        """The communicator of `group` (default: the default group, which must be initialised)."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group "
                               "(e.g. under torchrun) before opening a sharded NeuralDB")
        backend = str(dist.get_backend(group)).lower()
        if "nccl" in backend:  # "nccl", or a "cpu:gloo,cuda:nccl" group: the CUDA path
            if not torch.cuda.is_available():
                raise RuntimeError(f"the process group uses NCCL ({backend!r}) but this process sees no CUDA device")
            device = torch.device("cuda", torch.cuda.current_device())
        elif "gloo" in backend:
            device = torch.device("cpu")
        else:
            raise ValueError(f"the sharded NeuralDB runs on gloo (CPU) or NCCL (CUDA) process groups, got {backend!r}")
        return cls(group, dist.get_rank(group), dist.get_world_size(group), device, as_timeout(timeout))

    def _failure(self, error: RuntimeError, what: str) -> RankFailureError:
        limit = "the process group's timeout" if self.timeout is None else f"{self.timeout.total_seconds():g} s"
        return RankFailureError(
            f"rank {self.rank} of {self.world_size}: the {what} collective failed: another rank died, was "
            f"killed or did not answer within {limit} ({' '.join(str(error).split())[:500]}). The process "
            f"group cannot be used any more; restart the job (the shard files hold every committed write)")

    def _run(self, start, what: str) -> None:
        """Start a collective (`start()` returns its Work) and wait for it, at most the timeout."""
        try:
            work = start()
        except dist.DistBackendError as error:  # a peer already gone can fail the start
            raise self._failure(error, what) from error
        try:
            if self.timeout is None:
                work.wait()
            else:
                work.wait(self.timeout)
        except RuntimeError as error:
            raise self._failure(error, what) from error

    def all_gather(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """(world_size, *tensor.shape): every rank's `tensor` (same shape and dtype on every rank)."""
        local = tensor.to(self.device).contiguous()
        out = torch.empty(self.world_size * local.numel(), dtype=local.dtype, device=self.device)
        self._run(lambda: _all_gather_single(out, local.flatten(), group=self.group, async_op=True), what)
        return out.reshape(self.world_size, *local.shape).to(tensor.device)

    def all_reduce_sum(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """The elementwise sum over ranks of `tensor` (same shape and dtype on every rank)."""
        buffer = tensor.to(self.device, copy=True).contiguous()
        self._run(lambda: dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group, async_op=True), what)
        return buffer.to(tensor.device)

    def all_gather_object(self, value, what: str) -> list:
        """Every rank's picklable `value` (small: ids for reports; not on the per-token path)."""
        out = [None] * self.world_size
        try:
            dist.all_gather_object(out, value, group=self.group)
        except RuntimeError as error:
            raise self._failure(error, what) from error
        return out
