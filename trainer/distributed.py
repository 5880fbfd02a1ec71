"""Data parallelism over processes started by `accelerate launch` or `torchrun`, on accelerate.

Each process holds the whole frozen base and the same LoRA. A step's global batch (data.batch_size per
process x processes) is planned once from the one seed, identically on every process, and process r takes
rows r*b .. r*b+b-1 of it: its images, and its rows of the noise and timesteps drawn for the whole global
batch. After backward only the LoRA gradients are averaged across processes (one flat all-reduce; the
frozen base is never wrapped for gradients), so every process takes the same optimizer step and a run of
N processes x batch b is, to float rounding, the run of 1 process x batch N*b. That is why each process's
noise differs yet all of it derives from the one seed, and why a resume on another number of processes is
allowed when the global batch stays the same. Process 0 alone writes files and reports; the others wait at
barriers. Stop requests and failures are agreed on every step, so all processes stop together.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from .errors import ZitError

TIMEOUT = timedelta(minutes=10)
"""How long a collective waits for the other processes (a hung peer ends the job after this)."""


class DistributedError(ZitError):
    """A multi-process run we refuse or that lost a process; the message is one line."""


@dataclass
class Processes:
    """This process's place in the job (a single process: rank 0 of 1, no collectives)."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None
    accelerator: Any = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and reports (rank 0)."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    @property
    def share(self) -> tuple[int, int]:
        """(rank, world): take every world-th item from rank on."""
        return self.rank, self.world

    def rows(self, batch_size: int) -> slice:
        """This process's rows of a global batch of batch_size x world."""
        return slice(self.rank * batch_size, (self.rank + 1) * batch_size)

    def barrier(self) -> None:
        """Wait for every process (no-op alone)."""
        if self.parallel:
            self._collective(lambda: torch.distributed.barrier())

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the processes, in place, in one all-reduce."""
        if not self.parallel or not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        self._collective(lambda: torch.distributed.all_reduce(flat))
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def any(self, flag: bool) -> bool:
        """Whether any process passed True (every process gets the same answer)."""
        if not self.parallel:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self._collective(lambda: torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX))
        return bool(value.item())

    def ranks_differing(self, text: str) -> list[int]:
        """The ranks whose `text` differs from rank 0's (e.g. a config's canonical form)."""
        if not self.parallel:
            return []
        digest = hashlib.sha256(text.encode()).digest()[:8]
        mine = torch.tensor(list(digest), dtype=torch.float32, device=self.device)
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        self._collective(lambda: torch.distributed.all_gather(every, mine))
        return [r for r, d in enumerate(every) if not torch.equal(d, every[0])]

    def close(self) -> None:
        """Leave the process group (alone: nothing to do)."""
        if self.parallel and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def _collective(self, call: Any) -> None:
        try:
            call()
        except (RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DistributedError(f"process {self.rank} lost the other processes of this job "
                                   f"({first[:160]}); the last checkpoint is intact: resume it") from None


SINGLE = Processes()


def launched_world() -> int:
    """Processes the launcher started (WORLD_SIZE from accelerate launch / torchrun; 1 when run directly)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise DistributedError(f"WORLD_SIZE = {os.environ['WORLD_SIZE']!r} is not a number") from None


def start_processes() -> Processes:
    """Join the launcher's process group through accelerate (gloo on CPU, NCCL on CUDA); alone: SINGLE."""
    if launched_world() == 1:
        return SINGLE
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # cpu=True without CUDA: otherwise accelerate gives each rank its own unsynchronised run.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=TIMEOUT)])
    return Processes(accelerator.process_index, accelerator.num_processes, accelerator.device, accelerator)


def check_split(bucket_sizes: dict[tuple[int, int], int], batch_size: int, world: int,
                drop_last: bool) -> None:
    """Refuse, before the model loads, a dataset that gives no batch at all (every bucket smaller than the
    global batch with drop_last) or whose batches cannot be split evenly over the processes."""
    glob = batch_size * world
    if drop_last and bucket_sizes and all(n < glob for n in bucket_sizes.values()):
        sizes = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(bucket_sizes.items()))
        per = f" (batch_size {batch_size} x {world} processes)" if world > 1 else ""
        raise DistributedError(
            f"data.drop_last = true and every bucket has fewer samples per epoch than the batch {glob}{per} "
            f"({sizes}), so there is no batch to train on; lower data.batch_size, raise data.repeats or set "
            "data.drop_last = false")
    if world == 1 or drop_last:
        return
    for (w, h), n in sorted(bucket_sizes.items()):
        if n % glob:
            raise DistributedError(
                f"data.drop_last = false: the {w}x{h} bucket has {n} samples per epoch, not a multiple of "
                f"the global batch {glob} (batch_size {batch_size} x {world} processes), so its last batch "
                "cannot be split evenly; set data.drop_last = true or change data.batch_size, data.repeats "
                "or the number of processes")


def check_parallel_run(cfg: Any, processes: Processes, config_text: str) -> None:
    """What a multi-process run refuses before loading anything: a config that differs between processes, a
    device chosen by hand."""
    if not processes.parallel:
        return
    differing = processes.ranks_differing(config_text)
    if differing:
        raise DistributedError(f"the config of process {differing[0]} differs from process 0's: every "
                               "process must read the same run.toml (and the same data)")
    if cfg.model.device:
        raise DistributedError(f"model.device = {cfg.model.device!r}: in a multi-process run each process "
                               "uses the device its launcher gives it; remove model.device")


def resume_rule(saved: dict[str, Any] | None, global_batch: int, world: int) -> str | None:
    """Why a saved run cannot continue with this global batch (None when it can). The rule: a run resumes on
    any number of processes as long as batch_size x processes (the global batch) is what it was."""
    if not saved or "global_batch" not in saved:
        return None if world == 1 else ("it was saved without a record of its processes; resume it on one "
                                        "process")
    if int(saved["global_batch"]) != global_batch:
        return (f"it was trained with a global batch of {saved['global_batch']} (data.batch_size x "
                f"{saved.get('processes', 1)} processes); this run has {global_batch} (x {world}): keep "
                "data.batch_size x processes the same to continue its data order")
    return None


def parallel_summary(cfg: Any, processes: Processes) -> str:
    """The line a multi-process run starts with: processes, global batch and the learning-rate rule."""
    o, d = cfg.optim, cfg.data
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "?"
    per_step = d.batch_size * processes.world * o.grad_accum
    return (f"data parallel: {processes.world} processes ({backend}, {processes.device}); global batch "
            f"{d.batch_size * processes.world} = data.batch_size {d.batch_size} x {processes.world} "
            "processes, "
            f"x optim.grad_accum {o.grad_accum} = {per_step} samples per optimizer step; optim.lr {o.lr:g} "
            "applies to the mean gradient of those samples (it is not scaled with the number of processes)")


def stop_on_launcher_signal(rank: int) -> None:
    """When the launcher ends this process (SIGTERM: another process of the job died), say so in one line and
    exit; checkpoints are written atomically, so the last one is intact whatever was being written."""

    def stop(signum: int, frame: Any) -> None:
        print(f"error: process {rank}: the launcher ended this job (another process stopped); the last "
              "checkpoint is intact: resume it", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
