"""Training on several processes of one node with torch.distributed (DistributedDataParallel).

`train.gpus: N` > 1 runs the trainer as N processes started by torchrun
(`torch.distributed.run --standalone --nnodes 1 --nproc-per-node N`: a rendezvous on a free
local port, never a fixed master port, so two jobs on one node cannot collide). Each process
(rank) reads RANK, WORLD_SIZE and LOCAL_RANK from the environment torchrun gives it, uses
GPU LOCAL_RANK (NCCL) or the CPU (Gloo), and trains on its share of every global batch; the
gradients are averaged across ranks, so N ranks take the steps one process would take with
the whole batch. Rank 0 alone validates and writes; every rank agrees once per step whether
to stop (SIGTERM reaches all of them, not necessarily between the same steps).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

__all__ = ["Ranks", "agree", "broadcast_value", "launch_command", "mean_over_ranks",
           "ranks_from_env", "start", "stop"]


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that validates and writes checkpoints, logs and the curve."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def ranks_from_env() -> Ranks:
    """The ranks torchrun set in the environment; one process without them."""
    if "WORLD_SIZE" not in os.environ:
        return Ranks()
    return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                 int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def launch_command(argv: list[str], processes: int) -> list[str]:
    """The command that runs `unetflow <argv>` as `processes` ranks under torchrun. The
    `--` keeps torchrun's parser off our options (it would take `--log` for an
    abbreviation of its own `--log-dir`)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(processes), "-m", "unetflow", "--", *argv]


def start(ranks: Ranks, device: torch.device) -> None:
    """Join the process group: NCCL between GPUs, Gloo on the CPU."""
    if ranks.distributed and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, rank=ranks.rank,
                                             world_size=ranks.world)


def stop() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def agree(loss: torch.Tensor, stop_requested: bool, ranks: Ranks) -> tuple[float, bool]:
    """(mean loss over the ranks, whether any rank asked to stop), in one all-reduce: every
    rank leaves each step with the same answer, so none waits in a collective for a rank
    that has stopped. `loss` stays on its device until here: reading it is the step's one
    wait for the GPU."""
    if not ranks.distributed:
        return float(loss), stop_requested
    flag = torch.tensor(float(stop_requested), dtype=torch.float64, device=loss.device)
    values = torch.stack([loss.detach().to(torch.float64), flag])
    torch.distributed.all_reduce(values)  # NCCL reduces tensors on the GPU
    mean, stops = values.tolist()
    return mean / ranks.world, stops > 0


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over all ranks (a new tensor; no gradient flows through it)."""
    total = value.detach().clone()
    torch.distributed.all_reduce(total)
    return total / torch.distributed.get_world_size()


def broadcast_value(value: float, ranks: Ranks, device: torch.device) -> float:
    """Rank 0's `value` on every rank (the validation metric drives the schedule everywhere)."""
    if not ranks.distributed:
        return value
    values = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.broadcast(values, src=0)
    return float(values[0])
