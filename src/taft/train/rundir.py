"""Run folders that are always whole: staged in a temporary sibling, committed with a manifest, renamed in.

A run is written into ``.<name>.tmp-<pid>-<token>`` beside the target. :meth:`RunFolder.commit` fsyncs every
file, writes ``run.json`` last (run id, and the size and SHA-256 of every other file) and renames the folder
into place; with ``overwrite`` the old run is first renamed to ``.<name>.old-<pid>-<token>`` and deleted only
after the new one is in place. A crash therefore leaves the target either absent, the old run or the new
run; leftovers are cleaned (or, for a backup whose swap never finished, restored) the next time a run
targets the same folder. :func:`verify_run` is what ``taft eval`` trusts: the files must match the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from taft._version import __version__
from taft.checkpoint import fsync_dir, fsync_file
from taft.errors import TaftError

MANIFEST = "run.json"
WITHDRAWN = "WITHDRAWN"  # a run its owner took back (its text says why and what to do); readers refuse it
MANIFEST_FORMAT = "taft-run/1"
# Files a run may hold; any of them present but not in the manifest does not belong to the run.
RUN_FILES = ("config.yaml", "base_head.safetensors", "delta.safetensors", "metrics.jsonl", "results.json")


class RunDirError(TaftError):
    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(target: Path, kind: str) -> list[tuple[Path, int]]:
    """``(path, pid)`` of ``.<name>.<kind>-<pid>-<token>`` siblings of ``target``."""
    prefix = f".{target.name}.{kind}-"
    out = []
    if target.parent.is_dir():
        for p in target.parent.iterdir():
            pid = p.name[len(prefix):].split("-")[0] if p.name.startswith(prefix) else ""
            if pid.isdigit():
                out.append((p, int(pid)))
    return out


def remove_path(path: Path) -> None:
    """Delete a file, a link or a folder tree (nothing if absent)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def recover(target: Path) -> None:
    """Clean what dead writers left beside ``target``: a backup whose swap never finished is restored."""
    for path, pid in _leftovers(target, "old"):
        if _pid_alive(pid) and pid != os.getpid():
            continue
        if not target.exists():
            os.rename(path, target)
        else:
            remove_path(path)
    for path, pid in _leftovers(target, "tmp"):
        if not _pid_alive(pid):
            remove_path(path)


def is_run_folder(path: Path) -> bool:
    return any((path / n).exists() for n in (MANIFEST, *RUN_FILES))


def check_output_dir(output_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse an output folder taft must not or cannot write, before any expensive work. Returns the target."""
    target = Path(output_dir).expanduser().absolute()
    try:
        recover(target)
    except OSError as e:
        raise RunDirError(f"--output-dir {target}: cannot clean up an interrupted earlier run ({e})") from e
    if target.exists() and not target.is_dir():
        raise RunDirError(f"--output-dir {target} is a file, not a folder; choose another path")
    if target.is_dir():
        cwd = Path.cwd().absolute()
        if target == cwd or target in cwd.parents or target == Path.home().absolute():
            raise RunDirError(f"--output-dir {target} is the current folder, one of its parents or the home folder; "
                              f"name a new folder for the run, e.g. runs/NAME")
        entries = sorted(p.name for p in target.iterdir())
        if entries and overwrite and not is_run_folder(target) and any(p.is_dir() for p in target.iterdir()):
            raise RunDirError(f"--output-dir {target} holds sub-folders and is not a taft run; --overwrite only "
                              f"replaces a run or a folder of plain files: choose another --output-dir")
        if entries and not overwrite:
            if is_run_folder(target):
                raise RunDirError(f"--output-dir {target} already holds a run; pass --overwrite to replace it (the "
                                  f"old run is kept until the new one is complete) or choose another --output-dir")
            shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} in all)" if len(entries) > 5 else "")
            raise RunDirError(f"--output-dir {target} is not empty ({shown}); choose a new or empty folder, or "
                              f"pass --overwrite to replace the folder and everything in it")
    ensure_writable_folder(target.parent, f"--output-dir {target}")
    return target


def ensure_writable_folder(folder: Path, what: str, error: type[TaftError] = RunDirError) -> None:
    """Create ``folder`` (and its parents) or fail with one clear ``error`` naming ``what`` (the flag and value):
    a file in the way, a folder that cannot be created, or one this process cannot write to."""
    nearest = next((p for p in (folder, *folder.parents) if p.exists()), None)  # the first existing ancestor
    if nearest is not None and not nearest.is_dir():
        raise error(f"{what}: {nearest} is a file, so no folder can be created there; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"{what}: cannot create the folder {folder} ({e.strerror or e})") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise error(f"{what}: the folder {folder} is not writable; choose another path")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Strict JSON (NaN and infinities become null), written to a temporary file, fsynced and renamed."""
    text = json.dumps(finite_json(data), indent=2, allow_nan=False)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finite_json(x: Any) -> Any:
    """``x`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else None
    if isinstance(x, dict):
        return {k: finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_json(v) for v in x]
    return x


class RunFolder:
    """Stage a run beside ``output_dir`` and move it in whole. Use as a context manager: an exception (or a
    missing :meth:`commit`) deletes the staging folder and leaves ``output_dir`` as it was.

    >>> with RunFolder("runs/a") as run:
    ...     (run.path / "config.yaml").write_text("...")
    ...     run.commit()
    """

    def __init__(self, output_dir: str | Path, *, overwrite: bool = False) -> None:
        self.target = check_output_dir(output_dir, overwrite=overwrite)
        self.overwrite = overwrite
        self.run_id = secrets.token_hex(16)
        token = self.run_id[:8]
        self.path = self.target.parent / f".{self.target.name}.tmp-{os.getpid()}-{token}"
        self._backup = self.target.parent / f".{self.target.name}.old-{os.getpid()}-{token}"
        try:
            self.path.mkdir()
        except OSError as e:
            raise RunDirError(f"--output-dir {self.target}: cannot write in {self.target.parent} "
                              f"({e.strerror or e})") from e
        self.committed = False

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self, **info: Any) -> Path:
        """fsync the files, write ``run.json`` (with ``info``), move the folder into place. Returns the target."""
        files = {}
        for p in sorted(self.path.iterdir()):
            if p.name == MANIFEST:
                continue
            fsync_file(p)
            files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        manifest = {"format": MANIFEST_FORMAT, "run_id": self.run_id, "taft_version": __version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info, "files": files}
        write_json(self.path / MANIFEST, manifest)
        fsync_dir(self.path)
        target = self.target
        if target.is_dir() and any(target.iterdir()) and not self.overwrite:
            raise RunDirError(f"--output-dir {target} was filled by someone else while this run trained; "
                              f"nothing was written. Choose another --output-dir")
        if target.exists() or target.is_symlink():
            os.rename(target, self._backup)  # the old run survives, under a hidden name, until the swap is done
            os.rename(self.path, target)
            fsync_dir(target.parent)
            remove_path(self._backup)
        else:
            os.rename(self.path, target)
            fsync_dir(target.parent)
        self.committed = True
        return target


def withdraw(run_dir: Path, reason: str) -> None:
    """Take a finished run back before changing what it was made from: every later :func:`verify_run` refuses
    it with ``reason`` until the folder is replaced (a shard store withdraws its composition before a forget
    commits, so a forget killed at any point never leaves a composition of forgotten examples readable)."""
    if not run_dir.is_dir():
        return
    tmp = run_dir / f".{WITHDRAWN}.tmp"
    tmp.write_text(reason + "\n")
    fsync_file(tmp)
    os.replace(tmp, run_dir / WITHDRAWN)
    fsync_dir(run_dir)


def verify_run(run_dir: str | Path) -> dict:
    """The manifest of a finished run, after checking that every file in the folder belongs to it (and that its
    owner did not :func:`withdraw` it)."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.exists():
        raise RunDirError(f"no run folder at {run_dir}; pass the --output-dir of `taft train`")
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file; pass the --output-dir folder of `taft train`")
    if (run_dir / WITHDRAWN).exists():
        try:
            reason = (run_dir / WITHDRAWN).read_text().strip()
        except (OSError, UnicodeDecodeError):
            reason = "its owner withdrew it"
        raise RunDirError(f"{run_dir} was withdrawn: {reason}")
    mpath = run_dir / MANIFEST
    if not mpath.is_file():
        if is_run_folder(run_dir):
            raise RunDirError(f"{run_dir} has no {MANIFEST}: the run did not finish, or an older taft wrote it "
                              f"(its files cannot be checked to belong together); train it again")
        raise RunDirError(f"{run_dir} is not a taft run folder (no {MANIFEST}, config.yaml or delta.safetensors); "
                          f"pass the --output-dir of `taft train`")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        assert manifest["format"] == MANIFEST_FORMAT and isinstance(files, dict)
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
        raise RunDirError(f"{mpath} is damaged or not a taft run manifest; train the run again") from None
    for name, entry in files.items():
        p = run_dir / name
        if not p.is_file():
            raise RunDirError(f"{run_dir}: {name} is listed in {MANIFEST} but missing; restore it or train again")
        if sha256_file(p) != entry.get("sha256"):
            raise RunDirError(f"{run_dir}: {name} does not match {MANIFEST} (SHA-256 differs): the folder mixes "
                              f"files of different runs or the file was modified; restore it or train again")
    strays = [n for n in RUN_FILES if (run_dir / n).exists() and n not in files]
    if strays:
        raise RunDirError(f"{run_dir}: {', '.join(strays)} is not part of this run (not in {MANIFEST}); it was "
                          f"left by another run: remove it or train again")
    for needed in ("config.yaml", "delta.safetensors"):
        if needed not in files:
            raise RunDirError(f"{run_dir}: {MANIFEST} lists no {needed}; this is not a complete run")
    return manifest
