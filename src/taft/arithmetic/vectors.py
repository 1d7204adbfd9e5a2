"""Task vectors ``τ_t = w_t − w0`` as named tensors, tied to their base encoder and fine-tuning mode.

The algebra is :mod:`taft.delta`'s (names, shapes, dtypes checked; never broadcast); this module adds what makes a
Δw a task vector: the base it was trained from (``base_fingerprint``: the backbone part of
:func:`taft.checkpoint.fingerprints`, shared by every task head on that encoder), the mode (weight-space and
tangent-space vectors compute different functions) and the task. Combining vectors of different bases or modes
is refused unless ``allow_mixed=True``.

>>> tau = task_vector(finetuned, base, mode="nonlinear", base_fingerprint=fp, task="sst2")  # doctest: +SKIP
>>> merged = combine([tau_sst2, tau_mr], [0.3, 0.3])      # Σ αᵢτᵢ, a dict[str, Tensor]   # doctest: +SKIP
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from taft import delta as D
from taft._version import __version__
from taft.checkpoint import atomic_save_file, content_hashes, read_safetensors
from taft.errors import TaftError

FORMAT = "taft-task-vector/1"


class TaskVectorError(TaftError):
    """A task vector that cannot be read, or vectors that must not be combined (other base, other mode)."""


@dataclass
class TaskVector:
    tensors: dict[str, Tensor]
    mode: str
    base_fingerprint: str
    task: str = ""
    info: dict[str, str] = field(default_factory=dict)  # free-form: model, lr, epochs, ...
    uid: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False, repr=False)  # memo key (suite)

    def __post_init__(self) -> None:
        if not self.tensors:
            raise TaskVectorError("a task vector needs at least one tensor")


def task_vector(finetuned: Mapping[str, Tensor], base: Mapping[str, Tensor], *, mode: str, base_fingerprint: str,
                task: str = "", info: dict[str, str] | None = None) -> TaskVector:
    """``τ = finetuned − base`` over the same names (:func:`taft.delta.subtract`)."""
    return TaskVector(D.subtract(finetuned, base), mode, base_fingerprint, task, dict(info or {}))


def check_same_origin(vectors: Sequence[TaskVector], *, allow_mixed: bool = False) -> None:
    """Refuse vectors of different bases or modes (unless ``allow_mixed``), and incompatible tensors or tensors
    holding NaN / inf (always)."""
    if not vectors:
        raise TaskVectorError("no task vectors given")
    first = vectors[0]
    for i, v in enumerate(vectors[1:], start=1):
        if allow_mixed:
            break
        if v.base_fingerprint != first.base_fingerprint:
            raise TaskVectorError(
                f"task vector #{i} ({v.task or 'unnamed'}) was trained from another base encoder (fingerprint "
                f"{v.base_fingerprint[:12]} vs {first.base_fingerprint[:12]}); pass allow_mixed=True only if you "
                "know the bases are interchangeable")
        if v.mode != first.mode:
            raise TaskVectorError(
                f"task vector #{i} ({v.task or 'unnamed'}) is a {v.mode!r} vector, #0 a {first.mode!r} one: they "
                "live in different spaces (weight vs tangent, or other parameters); pass allow_mixed=True to force")
    D.check_compatible(*(v.tensors for v in vectors))
    for i, v in enumerate(vectors):
        bad = non_finite(v.tensors)
        if bad:
            raise TaskVectorError(f"task vector #{i} ({v.task or 'unnamed'}) holds NaN or inf in {_names(bad)}: any "
                                  "sum, α grid or cosine with it is meaningless; fine-tune it again (smaller lr)")


def non_finite(tensors: Mapping[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an inf."""
    return [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _names(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")


def combine(vectors: Sequence[TaskVector], alphas: Sequence[float] | float, *,
            allow_mixed: bool = False) -> dict[str, Tensor]:
    """``Σ αᵢ τᵢ`` (one α for all when a float): the Δw to apply to the base."""
    check_same_origin(vectors, allow_mixed=allow_mixed)
    coefs = [float(alphas)] * len(vectors) if isinstance(alphas, int | float) else list(alphas)
    return D.linear_combination([v.tensors for v in vectors], coefs)


def apply(base: Mapping[str, Tensor], vectors: Sequence[TaskVector], alphas: Sequence[float] | float, *,
          allow_mixed: bool = False) -> dict[str, Tensor]:
    """``w0 + Σ αᵢ τᵢ`` in weight space (for a tangent-space vector, load ``combine(...)`` as Δw instead)."""
    return D.add(base, combine(vectors, alphas, allow_mixed=allow_mixed))


def cosine_matrix(vectors: Sequence[TaskVector], *, allow_mixed: bool = False) -> list[list[float]]:
    """Pairwise :func:`taft.delta.cosine` (float64); symmetric, unit diagonal."""
    check_same_origin(vectors, allow_mixed=allow_mixed)
    n = len(vectors)
    out = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            out[i][j] = out[j][i] = D.cosine(vectors[i].tensors, vectors[j].tensors)
    return out


# -- files --------------------------------------------------------------------------------------------------
def save_task_vector(tv: TaskVector, path: str | Path) -> Path:
    """safetensors with the base fingerprint, mode, task and content hashes; atomic (temp file, fsync, rename)."""
    path = Path(path)
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in tv.tensors.items()}
    bad = non_finite(tensors)
    if bad:
        raise TaskVectorError(f"save_task_vector: {_names(bad)} hold NaN or inf; refusing to write {path}")
    meta = {"format": FORMAT, "taft_version": __version__, "mode": tv.mode, "task": tv.task,
            "base_fingerprint": tv.base_fingerprint, "info": json.dumps(tv.info),
            "content_sha256": json.dumps(content_hashes(tensors))}
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_save_file(tensors, meta, path)


def load_task_vector(path: str | Path, *, device: torch.device | str = "cpu") -> TaskVector:
    path = Path(path)
    tensors, meta = read_safetensors(path, TaskVectorError, "load_task_vector")
    if meta.get("format") != FORMAT:
        raise TaskVectorError(f"load_task_vector: {path} is not a taft task vector (format {meta.get('format')!r}, "
                              f"expected {FORMAT!r})")
    bad = non_finite(tensors)
    if bad:
        raise TaskVectorError(f"load_task_vector: {path} holds NaN or inf in tensor {_names(bad)}; refusing to load "
                              "it (its training diverged or the file was edited): fine-tune it again")
    missing = [k for k in ("mode", "base_fingerprint", "content_sha256") if k not in meta]
    try:
        hashes, info = json.loads(meta.get("content_sha256", "{}")), json.loads(meta.get("info", "{}"))
    except ValueError:
        hashes, info, missing = None, None, [*missing, "readable content_sha256/info"]
    if info is not None and not isinstance(info, dict):
        missing.append("an info mapping")
    if missing:
        raise TaskVectorError(f"load_task_vector: {path} lacks {missing} in its metadata; it was not written by "
                              "save_task_vector: fine-tune it again")
    if hashes != content_hashes(tensors):
        raise TaskVectorError(f"load_task_vector: {path} does not match the content hashes stored when it was "
                              "saved: the file was modified or corrupted")
    return TaskVector({n: t.to(device) for n, t in tensors.items()}, meta["mode"], meta["base_fingerprint"],
                      meta.get("task", ""), info)
