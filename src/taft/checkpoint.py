"""Δw checkpoints: safetensors holding only the linearized tensors, plus metadata tying them to w0.

Metadata: ``taft_version``, ``arch``, ``scope``, ``reinit``, ``linearize_cls``, ``seed``, ``linearized``
(JSON list), ``base_fingerprint``: a SHA-256 over the architecture name and the names, shapes and float32
bytes of every base tensor the tangent model uses (w0 after re-initialization), and ``content_sha256``: one
SHA-256 per stored Δw tensor (name, dtype, shape, bytes), so a file whose bytes were changed after saving is
refused even when the new values are finite. Loading onto any other base is refused; so is a non-finite Δw,
on save and on load. Writes go to a temporary file that is fsynced and renamed over the target, so an
interrupted save never leaves a corrupt checkpoint behind.

Format ``taft-delta/3`` also records ``kind`` (``tangent``: TAFT's Δw of f_lin; ``nonlinear``: the same
parameters trained through the model's own forward — NLFT, LoRA-free baselines), ``dtype``, and the base
fingerprint split into ``backbone_fingerprint`` and ``head_fingerprint`` (task vectors trained with different heads
on one backbone share the first). A Δw of the other kind is refused on load. ``taft-delta/2`` (content hashes, no
kind) and ``taft-delta/1`` (neither) files are still read, without those checks.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import safetensors.torch
import torch
from safetensors.torch import save_file

from taft._version import __version__
from taft.errors import TaftError

FORMAT = "taft-delta/3"
FORMATS = ("taft-delta/1", "taft-delta/2", FORMAT)


class CheckpointError(TaftError):
    pass


def tensor_sha256(name: str, t: torch.Tensor) -> str:
    """SHA-256 of one stored tensor: its name, dtype, shape and raw bytes (any dtype, bfloat16 included)."""
    h = hashlib.sha256(name.encode())
    h.update(str(t.dtype).encode())
    h.update(str(tuple(t.shape)).encode())
    h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def content_hashes(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {n: tensor_sha256(n, t) for n, t in sorted(tensors.items())}


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def fingerprints(tm) -> dict[str, str]:
    """Content hashes of w0, in one pass over its tensors (dtype-independent: hashed as float32 on the CPU):
    ``"all"``, ``"head"`` (the task head a classifier adds: ``family.head_only()``; none for a bare backbone) and
    ``"backbone"`` (everything else)."""
    heads = tm.family.head_only()
    hashes = {part: hashlib.sha256(tm.family.arch.encode()) for part in ("all", "backbone", "head")}
    for name, t in sorted(tm.base_params().items()):
        in_head = any(name == p or name.startswith(p + ".") for p in heads)
        data = (name.encode(), str(tuple(t.shape)).encode(),
                t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        for part in ("all", "head" if in_head else "backbone"):
            for d in data:
                hashes[part].update(d)
    return {part: h.hexdigest() for part, h in hashes.items()}


def base_fingerprint(tm, part: str = "all") -> str:
    """One of :func:`fingerprints` (``part``: ``"all"``, ``"backbone"`` or ``"head"``)."""
    if part not in ("all", "backbone", "head"):
        raise ValueError(f"base_fingerprint: part must be all, backbone or head, not {part!r}")
    return fingerprints(tm)[part]


def delta_kind(tm) -> str:
    return "tangent" if tm.linear else "nonlinear"


def delta_metadata(tm) -> dict[str, str]:
    fp = fingerprints(tm)
    return {
        "format": FORMAT,
        "taft_version": __version__,
        "arch": tm.family.arch,
        "scope": str(tm.scope),
        "reinit": json.dumps(tm.reinit),
        "linearize_cls": json.dumps(tm.linearize_cls),
        "seed": json.dumps(tm.seed),
        "linearized": json.dumps(tm.linearized),
        "base_fingerprint": fp["all"],
        "backbone_fingerprint": fp["backbone"],
        "head_fingerprint": fp["head"],
        "kind": delta_kind(tm),
        "dtype": str(next(iter(tm.delta_dict().values())).dtype).removeprefix("torch."),
    }


def save_delta(tm, path: str | Path, *, extra_metadata: dict[str, str] | None = None,
               run_id: str | None = None, tmp: str | Path | None = None) -> Path:
    """Save Δw of ``tm`` to ``path`` (safetensors). Returns the path.

    A Δw holding NaN or inf is refused (it could never be loaded). ``run_id`` ties the file to the
    ``run.json`` manifest of a run folder. ``tmp``: the temporary sibling to write first (default: a hidden,
    per-process name)."""
    tensors = {n: d.detach().to("cpu").contiguous() for n, d in tm.delta_dict().items()}
    return write_delta(tensors, delta_metadata(tm), path, extra_metadata=extra_metadata, run_id=run_id, tmp=tmp)


def write_delta(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: str | Path, *,
                extra_metadata: dict[str, str] | None = None, run_id: str | None = None,
                tmp: str | Path | None = None) -> Path:
    """Write ``tensors`` with a model's :func:`delta_metadata` ``meta`` (its content hash, run id and user keys are
    replaced): the one writer of Δw files, atomic (temporary file, fsync, rename)."""
    path = Path(path)
    bad = _non_finite(tensors)
    if bad:
        raise CheckpointError(f"save_delta: Δw holds NaN or inf in {_short(bad)}; refusing to write {path} "
                              f"(training diverged: lower the learning rate)")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in meta.items() if k not in ("content_sha256", "run_id") and not k.startswith("user.")}
    meta["content_sha256"] = json.dumps(content_hashes(tensors))
    if run_id is not None:
        meta["run_id"] = run_id
    for k, v in (extra_metadata or {}).items():
        meta[f"user.{k}"] = str(v)
    return atomic_save_file(tensors, meta, path, tmp=tmp)


def atomic_save_file(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: str | Path, *,
                     tmp: str | Path | None = None) -> Path:
    """safetensors ``save_file`` made atomic: written to ``tmp`` (default: a hidden per-process sibling), fsynced,
    renamed over ``path``; an interrupted write never leaves a partial file at ``path``."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (POSIX: fsync the folder)."""
    fsync_file(path)


def read_safetensors(path: str | Path, error: type[Exception], who: str
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a missing, truncated or foreign file raises ``error`` with a
    message starting ``who:`` (Δw files here, task vectors in :mod:`taft.arithmetic.vectors`)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{who}: no file at {path}")
    try:
        return load_safetensors(path)
    except Exception as e:  # safetensors raises its own error types for truncated / foreign files
        raise error(f"{who}: {path} is not a readable safetensors file ({e})") from e


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, read into memory (not memory-mapped: a file truncated or
    replaced by another process while its tensors are in use cannot crash this one with SIGBUS)."""
    data = Path(path).read_bytes()
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < size <= len(data) - 8:
        raise ValueError(f"{path}: not a safetensors file (header length {size}, file size {len(data)})")
    header = json.loads(data[8:8 + size])
    meta = header.get("__metadata__") or {} if isinstance(header, dict) else {}
    return safetensors.torch.load(data), meta


def read_delta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a Δw file, checked to be finite and (format 2) to match their content hashes;
    no checks against a model."""
    path = Path(path)
    tensors, meta = read_safetensors(path, CheckpointError, "load_delta")
    if meta.get("format") not in FORMATS:
        if str(meta.get("format", "")).startswith("taft-delta/"):
            raise CheckpointError(f"load_delta: {path} has format {meta['format']!r}, which this taft "
                                  f"({__version__}) cannot read; supported: {list(FORMATS)}")
        raise CheckpointError(f"load_delta: {path} has no taft metadata; it was not written by taft.save_delta")
    bad = _non_finite(tensors)
    if bad:
        raise CheckpointError(f"load_delta: {path} holds NaN or inf in {_short(bad)}; refusing to load it")
    if meta["format"] != "taft-delta/1":
        _check_content(path, tensors, meta)
    return tensors, meta


def _check_content(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    try:
        stored = json.loads(meta["content_sha256"])
        assert isinstance(stored, dict)
    except (KeyError, ValueError, AssertionError):
        raise CheckpointError(f"load_delta: {path} has no valid content hash in its metadata; the file is "
                              f"damaged: restore it or retrain") from None
    if set(stored) != set(tensors):
        missing, extra = sorted(set(stored) - set(tensors)), sorted(set(tensors) - set(stored))
        raise CheckpointError(f"load_delta: {path} does not hold the tensors it was saved with "
                              f"(missing={_short(missing)} extra={_short(extra)}); restore the file or retrain")
    for n, t in sorted(tensors.items()):
        if tensor_sha256(n, t) != stored[n]:
            raise CheckpointError(
                f"load_delta: {n!r} in {path} (shape {tuple(t.shape)}, dtype {t.dtype}) does not match the content "
                f"hash stored when it was saved: the file was modified or corrupted; restore it or retrain")


def load_delta(tm, path: str | Path) -> dict[str, str]:
    """Load Δw from ``path`` into ``tm`` after checking that it belongs to this base and scope.

    Tensors are moved to Δw's device; a dtype different from the model's is an error (no silent cast)."""
    tensors, meta = read_delta(path)
    if meta["arch"] != tm.family.arch:
        raise CheckpointError(
            f"load_delta: {path} is for architecture {meta['arch']!r}, the model is {tm.family.arch!r}"
        )
    kind = meta.get("kind")  # absent in formats 1 and 2
    if kind is not None and kind != delta_kind(tm):
        if kind == "nonlinear":
            how, want = "through the model itself, e.g. NLFT", "TangentModel(..., linear=False)"
        else:
            how, want = "as TAFT, in the tangent space", "TangentModel(...) (linear=True)"
        raise CheckpointError(
            f"load_delta: {path} holds a {kind} Δw (trained {how}), the model is {delta_kind(tm)}: they compute "
            f"different functions. Load it into {want}"
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
    try:
        tm.load_delta({n: t.to(device) for n, t in tensors.items()})
    except ValueError as e:  # names / shapes / dtype: say which file
        raise CheckpointError(f"{path}: {e}") from e
    return meta


def _short(names: list[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "") if names else "none"
