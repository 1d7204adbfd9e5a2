"""Data-parallel training over processes and machines (``torchrun``): who this process is, which examples it
holds, and the few collectives the training loops need.

Under ``torchrun --nproc-per-node N [--nnodes M ...] -m taft train ...`` every process (rank) runs the same
command. Example ``i`` of every split belongs to rank ``i mod W`` (W ranks in all), and each rank computes the
prefix features of its own examples only. The global batches are drawn exactly as in one process (same seed,
same example lengths: the ranks exchange lengths once per split); each rank runs the suffix on the examples of
every global batch it owns, and one all-reduce per step sums the gradients (each rank's loss is its share of the
global batch mean) and the loss. The optimizer then takes the same step on every rank, so Δw stays the same
everywhere and equals the single-process run up to the order of floating-point sums. Accuracies are sums of
correct counts over ranks. Rank 0 alone writes the run folder; an error on rank 0 before or after training
(:func:`on_rank0`) is raised on every rank, a rank that dies ends the others (gloo/NCCL errors, or torchrun's
SIGTERM, which is turned into a clean exit that deletes the staging folder).

Cost per step: one all-reduce of the trained parameters' size plus a few scalars. At start-up: an exchange of
digests (config, data, weights) and of each split's lengths (one integer per example).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from taft.errors import TaftError
from taft.train.cache import FeatureCache

T = TypeVar("T")
# Seconds a collective (or the start-up) waits for the other ranks before failing the run; long enough for one
# rank to cache its prefix features while another is already waiting (override: TAFT_DIST_TIMEOUT_S).
DEFAULT_TIMEOUT_S = 1800
# Fields that may differ between ranks: paths (data identity is checked by content digests instead), per-process
# settings, and what only rank 0 uses (the run folder).
LOCAL_FIELDS = ("data", "data_root", "test_file", "cache", "cache_dir", "threads", "output_dir", "overwrite")


class DistributedError(TaftError):
    """A multi-process run that cannot go on: ranks that disagree, a setting that does not distribute, or an error
    another rank raised."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel job (rank 0 of 1 outside ``torchrun``)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def many(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> Ranks:
    """The ranks ``torchrun`` announced in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    try:
        return Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as e:
        raise DistributedError(f"RANK / WORLD_SIZE / LOCAL_RANK are not integers ({e}); start with torchrun") from e


def current() -> Ranks:
    """The ranks of the initialized default process group, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return Ranks()


def device_for(name: str, ranks: Ranks) -> str:
    """The device a rank trains on: ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per process); one fixed GPU or
    MPS cannot be shared out between ranks and is refused."""
    if not ranks.many or name == "cpu":
        return name
    if name == "cuda":
        return f"cuda:{ranks.local_rank}"
    if name.startswith("cuda:"):
        raise DistributedError(f"--device {name} under torchrun: every rank takes its own GPU (cuda:LOCAL_RANK); "
                               f"use --device cuda")
    raise DistributedError(f"--device {name} under torchrun: data-parallel runs use cpu (gloo) or cuda (nccl)")


def _timeout() -> datetime.timedelta:
    raw = os.environ.get("TAFT_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DistributedError(f"TAFT_DIST_TIMEOUT_S={raw!r}: give the collectives' timeout in seconds, e.g. 1800")
    return datetime.timedelta(seconds=seconds)


def _terminate(signum, frame) -> None:  # noqa: ARG001
    raise SystemExit(128 + signum)  # unwinds: the staging folder is deleted on the way out


def _attempt_store(ranks: Ranks, timeout: datetime.timedelta) -> dist.Store | None:
    """torchrun's own store, its keys prefixed by the restart attempt; ``None`` outside torchrun's agent store.

    torchrun keeps one store for all attempts of a job, and process groups find each other by fixed keys in it: after
    ``--max-restarts`` restarted the workers, a rank could read the address the previous attempt's rank 0 left there
    and fail to connect (pytorch/pytorch#135712). ``TORCHELASTIC_RESTART_COUNT`` counts the attempts on each node;
    the nodes agree on it when a failure restarts them all, which is the restart this handles."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), ranks.world, is_master=False,
                         timeout=timeout)
    return dist.PrefixStore(f"taft/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


@contextlib.contextmanager
def joined(device: str) -> Iterator[tuple[Ranks, str]]:
    """Join the ``torchrun`` job this process belongs to, for the duration of one run: yields ``(ranks, device)``.

    Outside torchrun (or with one process) nothing happens. An already initialized default group (a caller that
    set one up itself) is used as it is and left open. Otherwise the group is initialized from the environment
    (``nccl`` for cuda, ``gloo`` for cpu, with a timeout on every collective), SIGTERM — what torchrun sends the
    survivors when a rank dies — becomes a clean exit, and the group is destroyed at the end."""
    if dist.is_available() and dist.is_initialized():
        ranks = current()
        yield ranks, device_for(device, ranks)
        return
    ranks = from_env()
    if not ranks.many:
        yield ranks, device
        return
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run in one process")
    device = device_for(device, ranks)
    if device.startswith("cuda"):
        if not torch.cuda.is_available() or ranks.local_rank >= torch.cuda.device_count():
            raise DistributedError(f"rank {ranks.rank} needs GPU cuda:{ranks.local_rank}, and this machine has "
                                   f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; start at most "
                                   f"that many processes per node (--nproc-per-node)")
        torch.cuda.set_device(ranks.local_rank)
    backend, timeout = "nccl" if device.startswith("cuda") else "gloo", _timeout()
    try:
        store = _attempt_store(ranks, timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=ranks.rank, world_size=ranks.world, timeout=timeout)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"rank {ranks.rank} could not join the other {ranks.world - 1} process(es) ({e}); "
                               f"check the torchrun --rdzv-endpoint / MASTER_ADDR and that every node started") from e
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        yield ranks, device
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)
        dist.destroy_process_group()


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """A collective whose failure (a rank that died or stopped, a timeout) becomes one clear error."""
    try:
        yield
    except RuntimeError as e:  # torch.distributed.DistBackendError and the store's errors are RuntimeErrors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DistributedError(f"{what} failed: another rank stopped, or could not be reached within the timeout "
                               f"({first}); nothing was written by this run") from e


# -- agreement ---------------------------------------------------------------------------------------------------
def on_rank0(fn: Callable[[], T], ranks: Ranks) -> T | None:
    """``fn()`` on rank 0 only (the others get ``None``). If it fails, rank 0 raises its error and every other rank a
    :class:`DistributedError` with the same text, so the whole job stops with one message instead of waiting.
    Cost: one small broadcast."""
    if not ranks.many:
        return fn()
    result, error, failure = None, None, [None]
    if ranks.main:
        try:
            result = fn()
        except Exception as e:  # re-raised below, after the others heard of it
            error, failure = e, [f"{e}"]
    with _collective("waiting for rank 0"):
        dist.broadcast_object_list(failure, src=0)
    if error is not None:
        raise error
    if failure[0] is not None:
        raise DistributedError(f"rank 0 stopped the run: {failure[0]}")
    return result


def config_digest(cfg) -> str:
    """SHA-256 of a config's fields, except the ones each rank may set for itself (:data:`LOCAL_FIELDS`)."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in LOCAL_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, dtypes, values). Cost: one pass over the weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_same(parts: dict[str, str], ranks: Ranks) -> None:
    """Refuse to go on unless every rank has the same ``parts`` (digests of config, data and weights): every rank
    raises the same :class:`DistributedError` naming the first rank that differs and what. Cost: one all-gather."""
    if not ranks.many:
        return
    everyone: list[dict[str, str] | None] = [None] * ranks.world
    with _collective("comparing the ranks' config, data and weights"):
        dist.all_gather_object(everyone, parts)
    for r, other in enumerate(everyone):
        differ = [k for k in everyone[0] if other.get(k) != everyone[0].get(k)]
        if differ:
            raise DistributedError(
                f"rank {r} runs with another {' and '.join(differ)} than rank 0; every process of a torchrun job "
                f"must run the same command on the same data files and model weights (compare the nodes' copies)")


# -- examples and gradients ------------------------------------------------------------------------------------------
def owned(n: int, ranks: Ranks) -> list[int]:
    """Global indices of the examples (of a split of ``n``) this rank holds: ``rank, rank + W, ...``."""
    return list(range(ranks.rank, n, ranks.world))


class RankShard:
    """The part of a split one rank holds: features of the examples it owns, addressed by global index.

    Reads like the whole split's :class:`FeatureCache` where the loops need it to (``len`` and ``lengths`` are
    global, so every rank draws the same global batches); :meth:`held` picks this rank's part of a batch."""

    def __init__(self, cache: FeatureCache, owned: Sequence[int], lengths: Sequence[int]) -> None:
        if len(cache) != len(owned):
            raise ValueError(f"RankShard: {len(cache)} feature rows for {len(owned)} owned examples")
        self.cache = cache
        self.owned = list(owned)
        self.rows = {i: r for r, i in enumerate(self.owned)}
        self._lengths = list(lengths)

    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def lengths(self) -> list[int]:
        return self._lengths

    def held(self, indices: Sequence[int]) -> list[int]:
        """The global indices among ``indices`` this rank holds, in their order."""
        return [i for i in indices if i in self.rows]

    def collate(self, indices: Sequence[int], device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        """:meth:`FeatureCache.collate` of held examples given by global index."""
        return self.cache.collate([self.rows[i] for i in indices], device, dtype)


def shard_view(cache: FeatureCache, n: int, ranks: Ranks) -> FeatureCache | RankShard:
    """``cache`` (the rows of :func:`owned` of a split of ``n``) as a :class:`RankShard` with the split's global
    lengths (one all-gather of this rank's lengths); the cache itself in a single process."""
    if not ranks.many:
        return cache
    everyone: list[list[int] | None] = [None] * ranks.world
    with _collective("exchanging example lengths"):
        dist.all_gather_object(everyone, cache.lengths)
    lengths = [0] * n
    for r, part in enumerate(everyone):
        for i, length in zip(range(r, n, ranks.world), part, strict=True):
            lengths[i] = length
    return RankShard(cache, owned(n, ranks), lengths)


def held(cache: FeatureCache | RankShard, indices: Sequence[int]) -> list[int]:
    """This rank's part of a global batch (all of it in a single process)."""
    return cache.held(indices) if isinstance(cache, RankShard) else list(indices)


def all_reduce_sum(tensors: Sequence[Tensor], extra: Sequence[float] = ()) -> tuple[list[Tensor], list[float]]:
    """Element-wise sums over ranks of ``tensors`` and of the scalars ``extra``, in one all-reduce of a flat buffer
    (the tensors' promoted dtype, on their device). Cost: one collective of Σ numel + len(extra) numbers."""
    if not tensors:
        raise ValueError("all_reduce_sum: no tensors")
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    device = tensors[0].device
    flat = torch.cat([*(t.detach().reshape(-1).to(dtype) for t in tensors),
                      torch.tensor(list(extra), dtype=dtype, device=device)])
    with _collective("the all-reduce of a training step"):
        dist.all_reduce(flat)
    out, s = [], 0
    for t in tensors:
        out.append(flat[s : s + t.numel()].view(t.shape).to(t.dtype))
        s += t.numel()
    return out, flat[s:].tolist()


def sum_gradients(params: Sequence[Tensor], loss: float) -> float:
    """Replace each parameter's ``.grad`` by its sum over ranks and return the summed ``loss``: one all-reduce per
    step. A parameter no rank has a gradient for keeps ``None`` (as after one process's backward)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has = [float(p.grad is not None) for p in params]
    summed, extra = all_reduce_sum(grads, [loss, *has])
    for p, g, h in zip(params, summed, extra[1:], strict=True):
        p.grad = g if h > 0 else None
    return extra[0]


def sum_counts(*counts: float) -> list[float]:
    """Scalar sums over the ranks of the default group (one small all-reduce); the counts themselves outside one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(counts)
    buf = torch.tensor(counts, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        buf = buf.cuda()
    with _collective("summing accuracy counts"):
        dist.all_reduce(buf)
    return buf.tolist()
