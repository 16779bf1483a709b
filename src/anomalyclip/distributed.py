"""Several processes, one job: ``torchrun``'s environment, ranks, sharding and gathering.

Every process of a ``torchrun`` launch runs the same command. :func:`init_from_env` reads
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, joins the process group (gloo on CPU, NCCL
on CUDA) and places the process on the GPU of its local rank; without those variables
(or with a world of one) it does nothing, so the same code runs single-process. Every
helper here is a no-op or the identity in a single process.

Training and evaluation use these helpers to split their work: an item (an image in
training, a batch in evaluation) belongs to rank ``i mod world``, results are gathered
on rank 0, and only rank 0 writes files, logs at INFO level and shows progress bars.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAIN_RANK = 0
ENV_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class LaunchEnvironment:
    """This process's place in a launch, as ``torchrun`` describes it in the environment."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LaunchEnvironment:
        """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; all absent means one process."""
        environ = os.environ if environ is None else environ
        values = {}
        for name in ENV_VARIABLES:
            text = environ.get(name)
            if text is None:
                continue
            try:
                values[name] = int(text)
            except ValueError:
                raise ValueError(
                    f"environment variable {name}={text!r} is not an integer"
                ) from None
        if "WORLD_SIZE" not in values:
            return cls()
        world = values["WORLD_SIZE"]
        rank = values.get("RANK", 0)
        local = values.get("LOCAL_RANK", rank)
        if world < 1 or not 0 <= rank < world or local < 0:
            raise ValueError(
                f"inconsistent launch environment: RANK={rank}, WORLD_SIZE={world}, "
                f"LOCAL_RANK={local}"
            )
        return cls(rank, world, local)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def backend_for(device: str | torch.device) -> str:
    """NCCL for CUDA devices, gloo for CPU; other devices cannot run distributed."""
    kind = torch.device(device).type
    if kind == "cuda":
        return "nccl"
    if kind == "cpu":
        return "gloo"
    raise ValueError(
        f"device {str(device)!r} cannot run distributed: use cpu (gloo) or cuda (NCCL)"
    )


def device_for(device: str | torch.device, launch: LaunchEnvironment) -> torch.device:
    """The device of this process: ``cuda`` becomes ``cuda:<LOCAL_RANK>`` in a launch.

    An explicit GPU index is refused when several processes run, as they would all
    share that one GPU.
    """
    chosen = torch.device(device)
    if not launch.distributed or chosen.type != "cuda":
        return chosen
    if chosen.index is not None:
        raise ValueError(
            f"--device {chosen} names one GPU for all {launch.world_size} processes; use "
            "--device cuda: each process then takes the GPU of its LOCAL_RANK"
        )
    return torch.device("cuda", launch.local_rank)


def init_from_env(
    device: str | torch.device = "cpu", timeout: timedelta | None = None
) -> torch.device:
    """Join the launch's process group if there is one; the device this process uses.

    With ``WORLD_SIZE`` unset or 1 nothing is initialised and ``device`` is returned as
    given. Under ``torchrun`` the group is initialised from its environment variables
    (``env://``), with the backend that suits ``device``.
    """
    launch = LaunchEnvironment.from_env()
    placed = device_for(device, launch)
    if not launch.distributed or is_distributed():
        return placed
    backend = backend_for(placed)
    if backend == "nccl":
        torch.cuda.set_device(placed)
    options: dict[str, Any] = {"backend": backend, "init_method": "env://"}
    if timeout is not None:
        options["timeout"] = timeout
    dist.init_process_group(rank=launch.rank, world_size=launch.world_size, **options)
    logger.debug("rank %d of %d joined the %s group on %s", rank(), world_size(), backend, placed)
    return placed


def shutdown() -> None:
    """Leave the process group, after every rank has reached this point."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(
    device: str | torch.device = "cpu", timeout: timedelta | None = None
) -> Iterator[torch.device]:
    """:func:`init_from_env` for the duration of a command; the group is left on success.

    After an error the group is not waited on: the other processes may never get there,
    and ``torchrun`` stops them when this one exits.
    """
    owned = not is_distributed()
    placed = init_from_env(device, timeout)
    yield placed
    if owned:
        shutdown()


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0, the process that writes files, logs and shows progress."""
    return rank() == MAIN_RANK


def _collective_device() -> torch.device:
    """Where tensors of a collective must live: NCCL needs them on this process's GPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank gets here; nothing in a single process."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (downloads, folder creation), then the others."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def owner(index: int, world: int | None = None) -> int:
    """The rank that item ``index`` belongs to: ``index mod world``."""
    return index % (world_size() if world is None else world)


def gather_to_main(value: T) -> list[T] | None:
    """Every rank's ``value``, in rank order, on rank 0 (None elsewhere); pickled objects.

    Large values (anomaly maps) are best sent in pieces, so that rank 0 never holds
    more than one piece per rank besides what it keeps.
    """
    if not is_distributed():
        return [value]
    gathered: list[Any] | None = [None] * world_size() if is_main_process() else None
    dist.gather_object(value, gathered, dst=MAIN_RANK)
    return gathered


def all_gather(value: T) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_from_main(value: T) -> T:
    """Rank 0's ``value`` on every rank (the argument is ignored elsewhere)."""
    if not is_distributed():
        return value
    holder: list[Any] = [value if is_main_process() else None]  # rank 0's value after this
    dist.broadcast_object_list(holder, src=MAIN_RANK)
    return holder[0]


def run_on_main(function: Callable[[], T]) -> T:
    """``function()`` on rank 0 only, its result (or its exception) on every rank.

    For files that only rank 0 is sure to see (a checkpoint on its machine's disk, in a
    launch over several machines): the other ranks neither read them nor hang when
    rank 0 fails, but raise the same error.
    """
    if not is_distributed():
        return function()
    outcome: tuple[bool, Any] = (True, None)
    if is_main_process():
        try:
            outcome = (True, function())
        except Exception as error:  # sent to every rank, raised there
            outcome = (False, error)
    succeeded, value = broadcast_from_main(outcome)
    if not succeeded:
        raise value
    return value


def sum_across_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise sums over all ranks, in float64."""
    if not is_distributed():
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def sum_tensor_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed element-wise over all ranks, in place; returned for chaining.

    For results shared out by zeroing: each rank fills its own part of a zeroed tensor,
    and the sum is then the whole, exactly (x + 0 is x). The tensor travels through the
    collective's device (NCCL needs this process's GPU) when it lives elsewhere.
    """
    if not is_distributed():
        return tensor
    device = _collective_device()
    if tensor.device == device:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    tensor.copy_(moved)
    return tensor


class RankFilter(logging.Filter):
    """Other ranks than 0 keep only warnings and errors, each prefixed with its rank."""

    def __init__(self, of_rank: int) -> None:
        super().__init__()
        self.of_rank = of_rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.of_rank == MAIN_RANK:
            return True
        if record.levelno < logging.WARNING:
            return False
        if not getattr(record, "rank_prefixed", False):
            record.msg = f"[rank {self.of_rank}] {record.msg}"
            record.rank_prefixed = True
        return True


def configure_logging() -> None:
    """Keep INFO messages to rank 0: the others' handlers pass warnings and errors only."""
    if not is_distributed():
        return
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RankFilter) for f in handler.filters):
            handler.addFilter(RankFilter(rank()))
