"""Several processes, one command: ``torchrun --nproc_per_node N main.py ...`` (docs/method.md §12).

PyTorch's own launcher and collectives do the work; this module only reads what ``torchrun`` sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), starts the process group (NCCL on GPUs, gloo on CPUs) and
wraps the few collectives the runs use, so that a run without ``torchrun`` is exactly a one-process
run: every helper here is then a no-op.  A collective that fails because another rank stopped ends
this rank with one line (:class:`RankLost`), and ``torchrun`` then ends the job and names the rank
that stopped first.
"""
from __future__ import annotations

import datetime
import functools
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from utils.errors import UserError

# How long a rank waits for the others in one collective before the job is ended.
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("RESAD_DIST_TIMEOUT_MIN", "30")))


class RankLost(UserError):
    """A collective failed: another rank stopped (killed, out of memory, an error of its own)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: its rank, their number, its rank on its machine, the backend."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def primary(self) -> bool:
        """Rank 0: the one that writes files and prints results."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    def describe(self) -> Dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend or "none"}


_current = Ranks()
_owned = False      # whether this module started the process group (and so ends it)


def current() -> Ranks:
    return _current


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process in the job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "auto") -> Ranks:
    """Join the job torchrun started (once; later calls return the same :class:`Ranks`); a plain
    :class:`Ranks` (rank 0 of 1) without torchrun.  ``device``: the run's ``--device`` (a CUDA device
    makes the backend NCCL, anything else gloo)."""
    global _current
    if not launched() or _current.active:
        return _current
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():   # a caller's own job (the Inferencer inside someone's torchrun script): join it
        _current = Ranks(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())
        return _current
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda and device not in ("auto", "cuda"):
        raise UserError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; give --device cuda "
                        "or auto (or cpu)")
    if cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    global _owned
    _owned = True
    _current = Ranks(dist.get_rank(), dist.get_world_size(), local_rank, backend)
    signal.signal(signal.SIGTERM, _stopped_by_launcher)
    if not _current.primary:   # rank 0 alone prints results and progress bars; errors still reach stderr
        sys.stdout = open(os.devnull, "w")
        tqdm.__init__ = functools.partialmethod(tqdm.__init__, disable=True)
    return _current


def _stopped_by_launcher(signum, frame) -> None:
    raise RankLost(f"rank {_current.rank}: stopped by torchrun because another rank ended first (torchrun names "
                   "it); --resume continues from the last checkpoint")


def device_of(ranks: Ranks, device: str) -> Optional[str]:
    """The device flag this rank runs on: cuda:LOCAL_RANK under torchrun with CUDA, else ``device``."""
    if ranks.active and ranks.backend == "nccl":
        return f"cuda:{ranks.local_rank}"
    return device


def _collective(name: str, call):
    try:
        return call()
    except (RuntimeError, dist.DistBackendError) as err:  # gloo/NCCL: a peer closed its connection or timed out
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RankLost(f"rank {_current.rank}: {name} failed: another rank stopped ({first[:160]}); the job ends, "
                       "--resume continues from the last checkpoint") from None


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``tensor`` reduced over the ranks, in place (sum, max or min); itself without torchrun.  NCCL reduces
    CUDA tensors only: a CPU tensor (the step flags, partial statistics) goes through this rank's GPU."""
    if not _current.active:
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    on_backend = tensor.cuda() if _current.backend == "nccl" and tensor.device.type == "cpu" else tensor
    _collective("all_reduce", lambda: dist.all_reduce(on_backend, op=ops[op]))
    if on_backend is not tensor:
        tensor.copy_(on_backend.cpu())
    return tensor


def all_gather_object(value: Any) -> List[Any]:
    """Every rank's ``value``, in rank order (``[value]`` without torchrun)."""
    if not _current.active:
        return [value]
    found: List[Any] = [None] * _current.world_size
    _collective("all_gather_object", lambda: dist.all_gather_object(found, value))
    return found


def gather_object(value: Any, dst: int) -> Optional[List[Any]]:
    """Every rank's ``value`` on rank ``dst`` (None elsewhere)."""
    if not _current.active:
        return [value]
    found = [None] * _current.world_size if _current.rank == dst else None
    _collective("gather_object", lambda: dist.gather_object(value, found, dst=dst))
    return found


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank."""
    if not _current.active:
        return value
    box = [value]
    _collective("broadcast_object", lambda: dist.broadcast_object_list(box, src=src))
    return box[0]


def barrier() -> None:
    if _current.active:
        _collective("barrier", dist.barrier)


def average_gradients(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over the ranks (a missing gradient counts as zeros), in one
    flattened all-reduce."""
    if not _current.active or not parameters:
        return
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in parameters])
    all_reduce(flat).div_(_current.world_size)
    offset = 0
    for p in parameters:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p))
        offset += n


def average_buffers(module: torch.nn.Module) -> None:
    """Floating-point buffers (BatchNorm's running statistics) averaged over the ranks, so that every rank
    keeps the same model."""
    if not _current.active:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if buffers:
        flat = all_reduce(torch.cat([b.reshape(-1) for b in buffers])).div_(_current.world_size)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def mean_over_ranks(value: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The mean over the ranks of a scalar some ranks may lack (None); None when every rank lacks it.
    ``value`` itself without torchrun."""
    if not _current.active:
        return value
    pair = torch.tensor([0.0 if value is None else float(value), 0.0 if value is None else 1.0], dtype=torch.float64)
    total, count = all_reduce(pair).tolist()
    return None if count == 0 else torch.tensor(total / count, dtype=torch.float32)


def mean_values(values: Dict[str, float]) -> Dict[str, float]:
    """Each value's mean over the ranks (NaN ones left out; NaN when every rank's is); ``values`` itself
    without torchrun."""
    if not _current.active:
        return values
    everyone = all_gather_object(values)
    means = {}
    for key in values:
        found = [v[key] for v in everyone if v.get(key) == v.get(key)]
        means[key] = sum(found) / len(found) if found else float("nan")
    return means


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Rank ``src``'s parameters and buffers on every rank (the same start for all)."""
    if not _current.active:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        _collective("broadcast", lambda t=tensor: dist.broadcast(t.data, src=src))


def check_same(description: Dict[str, Any], what: str = "this run") -> None:
    """UserError on every rank unless all ranks describe the same run (arguments, data, code version)."""
    if not _current.active:
        return
    everyone = all_gather_object(description)
    for rank, theirs in enumerate(everyone):
        differs = sorted(k for k in set(description) | set(theirs) if description.get(k) != theirs.get(k))
        if differs:
            raise UserError(f"rank {rank} and rank {_current.rank} differ in {', '.join(differs)} of {what}; start "
                            "every rank with the same command, data and code version")


def shutdown() -> None:
    """Leave the process group at the end of a run (torchrun then ends the job)."""
    global _current, _owned
    if _owned and dist.is_initialized():
        dist.destroy_process_group()
    _current, _owned = Ranks(), False


def print_primary(*args, **kwargs) -> None:
    """``print`` on rank 0 only."""
    if _current.primary:
        print(*args, **kwargs)
        sys.stdout.flush()
