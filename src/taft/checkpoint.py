"""Δw checkpoints: safetensors holding only the linearized tensors, plus metadata tying them to w0.

Metadata: ``taft_version``, ``arch``, ``scope``, ``reinit``, ``linearize_cls``, ``seed``, ``linearized``
(JSON list) and ``base_fingerprint``: a SHA-256 over the architecture name and the names, shapes and float32
bytes of every base tensor the tangent model uses (w0 after re-initialization). Loading onto any other base is
refused. Writes go to a temporary file that is renamed over the target, so an interrupted save never leaves
a corrupt checkpoint behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import taft
from taft.errors import TaftError


class CheckpointError(TaftError):
    pass


def base_fingerprint(tm) -> str:
    """Content hash of w0 (dtype-independent: tensors are hashed as float32 on the CPU)."""
    h = hashlib.sha256(tm.family.arch.encode())
    for name, t in sorted(tm.base_params().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def delta_metadata(tm, fingerprint: str | None = None) -> dict[str, str]:
    return {
        "format": "taft-delta/1",
        "taft_version": taft.__version__,
        "arch": tm.family.arch,
        "scope": str(tm.scope),
        "reinit": json.dumps(tm.reinit),
        "linearize_cls": json.dumps(tm.linearize_cls),
        "seed": json.dumps(tm.seed),
        "linearized": json.dumps(tm.linearized),
        "base_fingerprint": fingerprint or base_fingerprint(tm),
    }


def save_delta(tm, path: str | Path, *, extra_metadata: dict[str, str] | None = None) -> Path:
    """Save Δw of ``tm`` to ``path`` (safetensors). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {n: d.detach().to("cpu").contiguous() for n, d in tm.delta_dict().items()}
    meta = delta_metadata(tm)
    for k, v in (extra_metadata or {}).items():
        meta[f"user.{k}"] = str(v)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_delta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a Δw file (no checks against a model)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"load_delta: no file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own error types for truncated / foreign files
        raise CheckpointError(f"load_delta: {path} is not a readable safetensors file ({e})") from e
    if meta.get("format") != "taft-delta/1":
        raise CheckpointError(f"load_delta: {path} has no taft metadata; it was not written by taft.save_delta")
    return tensors, meta


def load_delta(tm, path: str | Path) -> dict[str, str]:
    """Load Δw from ``path`` into ``tm`` after checking that it belongs to this base and scope.

    Tensors are moved to Δw's device; a dtype different from the model's is an error (no silent cast)."""
    tensors, meta = read_delta(path)
    if meta["arch"] != tm.family.arch:
        raise CheckpointError(
            f"load_delta: {path} is for architecture {meta['arch']!r}, the model is {tm.family.arch!r}"
        )
    saved = json.loads(meta["linearized"])
    if saved != tm.linearized:
        missing = _short(sorted(set(tm.linearized) - set(saved)))
        extra = _short(sorted(set(saved) - set(tm.linearized)))
        raise CheckpointError(
            f"load_delta: {path} linearizes a different parameter set (scope {meta['scope']!r} vs {tm.scope}); "
            f"missing={missing} extra={extra}. Build the TangentModel with scope={meta['scope']!r}."
        )
    fp = base_fingerprint(tm)
    if meta["base_fingerprint"] != fp:
        raise CheckpointError(
            f"load_delta: {path} was trained on a different base model (fingerprint {meta['base_fingerprint'][:12]} "
            f"vs {fp[:12]}): load the same pretrained weights (and reinit/seed settings) it was trained from"
        )
    device = next(iter(tm.delta_dict().values())).device
    tm.load_delta({n: t.to(device) for n, t in tensors.items()})
    return meta


def _short(names: list[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "") if names else "none"
