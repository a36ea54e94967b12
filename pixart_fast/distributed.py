"""Many processes, one trainer: torchrun's environment -> a process group, DDP or FSDP2 wrapping, and full
(unsharded) state dicts for checkpoints, so a checkpoint resumes under any world size.

    torchrun --nproc-per-node 8 -m pixart_fast.train --stage 2 ...              one machine, 8 GPUs
    torchrun --nnodes 4 --node-rank R --master-addr HOST --nproc-per-node 8 ... four machines (R = 0 .. 3)

Rank 0 alone writes (checkpoints, metrics, samples); every rank reads the checkpoint it resumes from and the
weights it starts from, so on several machines --out is a folder on a file system they all share, at the same
path (the trainer refuses to start when the ranks see different checkpoints or weights).

Every rank builds the same model from the same seed, draws the same global batch (indices, noise, timesteps,
caption drops) and takes its own slice `Dist.slice(batch_size)`; DDP averages the gradients, so N processes
at global batch B take the same steps as one process at batch B. Backend: nccl on CUDA, gloo on the CPU.
"""
import gc
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to rank 0, on the CPU


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. owns_group: `setup` created the process group (and `close` ends it)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, metrics, samples and logs."""
        return self.rank == 0

    def slice(self, batch_size: int) -> slice:
        """This rank's part of a global batch of batch_size samples."""
        if batch_size % self.world_size:
            raise ValueError(f"global batch size {batch_size} is not divisible by the {self.world_size} processes; "
                             f"pick a multiple of {self.world_size}")
        per_rank = batch_size // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of `values` over all ranks (itself in a single process)."""
        if self.world_size > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world_size
        return values

    def agree(self, *values: int) -> bool:
        """Whether every rank holds the same integers `values` (always, in a single process). A collective."""
        if self.world_size == 1:
            return True
        both = torch.tensor([*values, *(-v for v in values)], dtype=torch.int64, device=self.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)  # the largest value, and minus the smallest
        return bool((both[:len(values)] == -both[len(values):]).all())

    def close(self, finished: bool) -> None:
        """End the process group `setup` created. finished: every rank got here without an error; then each waits
        for the others (so no collective is still under way anywhere), and what the run left in reference cycles
        (sharded tensors, which hold the group's pending work) is freed while the interpreter is whole: freed at
        its exit instead, gloo's threads abort the process. After an error the group ends at once: the other ranks
        may never arrive."""
        if not self.owns_group:
            return
        if finished:
            dist.barrier()
            gc.collect()
        dist.destroy_process_group()


def setup(device=None) -> Dist:
    """Join the job torchrun started (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT in the environment), or
    run alone. device: None picks cuda:LOCAL_RANK when CUDA is there, else the CPU; "cuda" means cuda:LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if world_size == 1 and not dist.is_initialized():
        return Dist(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device, owns)


def _shard(model: torch.nn.Module) -> None:
    """FSDP2 units: the ones the model names (`model.fsdp_units()`: gathered just before they run, freed after),
    and the rest in one root unit."""
    for unit in model.fsdp_units():
        fully_shard(unit)
    fully_shard(model)


def wrap(model: torch.nn.Module, d: Dist, fsdp: bool) -> torch.nn.Module:
    """The module to run forward/backward on. fsdp: shard parameters, gradients and optimizer state across
    ranks in place (FSDP2, `fully_shard`); otherwise DDP when there are several processes. Create the
    optimizer from `model.parameters()` after this call."""
    if fsdp:
        if d.world_size == 1:
            raise ValueError("--fsdp true shards across processes: launch with torchrun --nproc-per-node N (N > 1)")
        _shard(model)
        return model
    if d.world_size == 1:
        return model
    device_ids = [d.device.index] if d.device.type == "cuda" else None
    # The buffers are constants: no sync before each forward (torch 2.13 renamed the switch and deprecated the old)
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=device_ids, **no_sync)


def shard_like(ema: torch.nn.Module, fsdp: bool) -> None:
    """Shard a copy of the model (the EMA) as `wrap` shards the model, so both hold the same slices."""
    if fsdp:
        _shard(ema)


def full_state_dict(module: torch.nn.Module) -> dict:
    """The whole state dict on rank 0's CPU (other ranks get {}); a collective under FSDP: call on every rank."""
    return get_model_state_dict(module, options=_FULL)


def full_optimizer_state_dict(module: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state keyed by parameter name (not index or shard), on rank 0's CPU: it loads
    under any world size and either wrapping. A collective under FSDP: call on every rank."""
    return get_optimizer_state_dict(module, opt, options=_FULL)


def load_optimizer_state_dict(module: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a `full_optimizer_state_dict` on every rank (each keeps its own shard under FSDP)."""
    set_optimizer_state_dict(module, opt, state, options=StateDictOptions(full_state_dict=True))


def full(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor, gathered first if it is a DTensor (clip_grad_norm_'s result under FSDP); stays on its
    device (no host sync)."""
    return value.full_tensor() if isinstance(value, DTensor) else value
