"""Data-parallel runs (torchrun, gloo, 2 processes on CPU) equal the single-process run; failures stop cleanly.

Each 2-process launch starts ``tests/train/ddp_worker.py`` under ``python -m torch.distributed.run`` (a few seconds
of imports per process); the single-process references run in this process.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from taft.checkpoint import load_safetensors
from taft.cli import main
from taft.config import TrainConfig
from taft.engine.reference import max_rel_err
from taft.train.cache import FeatureCache
from taft.train.distributed import (
    DistributedError,
    Ranks,
    RankShard,
    device_for,
    held,
    on_rank0,
    owned,
    shard_view,
)
from taft.train.loop import train
from taft.train.rundir import verify_run
from tests.train.test_images import _draw as draw_images

# float32 (the engine's training precision; TrainConfig has no float64): max |Δw₂ − Δw₁| over all of Δw, relative to
# the largest entry (tests/helpers.py's convention). Per-entry tolerances would fail on tensors whose gradient is
# exactly zero in exact arithmetic (an attention key bias): both runs hold floating-point noise there.
TOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

WORKER = Path(__file__).with_name("ddp_worker.py")
# Sentences of different lengths, so that the length-bucketed batches and the ranks' parts are uneven.
LINES = [f"{i % 2} sentence number {i} is {'good' if i % 2 else 'bad'}{' and more' * (i % 5)}" for i in range(60)]
BASE = dict(model="tiny-bert", head_init="random", epochs=1, max_train=40, max_eval=9, batch_size=8,
            optimizer="sgd", lr=1e-2, threads=1)
PRIVATE = dict(head_init="zeros", dp_epsilon=8.0, dp_delta=1e-3, epochs=2)
# Every method and option family that distributes; one launch trains them all. SGD: its step is linear in the
# gradient, so the comparison sees the all-reduce and nothing else (Adam turns the floating-point noise of a
# gradient that is exactly zero in exact arithmetic, such as an attention key bias's, into steps of size lr).
RUNS = {
    "taft": {},
    "nlft": {"method": "nlft"},
    "fc": {"method": "fc"},
    "lora": {"method": "lora"},
    "adapter": {"method": "adapter"},
    "taft-probe-all": {"head_init": "probe", "probe_epochs": 2, "scope": "all", "lr": 1e-3},
    "dp-taft": {**PRIVATE},
    "dp-nlft-per-example": {**PRIVATE, "method": "nlft", "dp_clipping": "per-example"},
    "vit-images": {"model": "tiny-vit", "data": "IMAGES", "test_file": None, "max_eval": None},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A text file, its test file, and an image folder (2 classes, 12 train and 3 test images each)."""
    root = tmp_path_factory.mktemp("ddp-data")
    (root / "d.txt").write_text("\n".join(LINES) + "\n")
    (root / "t.txt").write_text("\n".join(LINES[:10]) + "\n")
    rng = random.Random(0)
    draw_images(root / "images" / "train", 12, rng)
    draw_images(root / "images" / "test", 3, rng)
    return root / "d.txt", root / "t.txt", root / "images"


def _cfg(paths: tuple[Path, Path, Path], **kw) -> dict:
    cfg = {**BASE, "data": str(paths[0]), "test_file": str(paths[1]), **kw}
    if cfg["data"] == "IMAGES":
        cfg["data"] = f"imagefolder:{paths[2]}"
    return cfg


def _torchrun(*args: str, restarts: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TAFT_DIST_TIMEOUT_S": "120"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(restarts), "--monitor-interval", "0.2", str(WORKER), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _delta(run: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(run / "delta.safetensors")[0]


def _flat(delta: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([delta[n].flatten() for n in sorted(delta)])


@pytest.fixture(scope="module")
def two_process_runs(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp-runs")
    spec = out / "runs.json"
    spec.write_text(json.dumps({name: _cfg(data, **kw) for name, kw in RUNS.items()}))
    proc = _torchrun("runs", str(spec), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_train_what_one_does(name, data, two_process_runs, tmp_path):
    one = train(TrainConfig(**_cfg(data, **RUNS[name]), output_dir=str(tmp_path / name)), progress=False)
    run2 = two_process_runs / name
    verify_run(run2)
    two = json.loads((run2 / "results.json").read_text())
    assert (one.world_size, two["world_size"]) == (1, 2)
    a, b = _delta(tmp_path / name), _delta(run2)
    assert a.keys() == b.keys()
    assert _flat(a).abs().max() > 1e-4  # trained: the comparison is not vacuous
    assert max_rel_err(_flat(b), _flat(a)) <= TOL
    assert two["val_acc"] == one.val_acc and two["test_acc"] == one.test_acc  # counts summed over ranks
    for e1, e2 in zip(one.epochs, two["epochs"], strict=True):
        assert e2["delta_norm"] == pytest.approx(e1["delta_norm"], rel=1e-5)
        if "train_loss" in e1:  # the loss of every global batch, summed over the ranks
            assert e2["train_loss"] == pytest.approx(e1["train_loss"], rel=1e-5)
    if name.startswith("dp-"):  # the same guarantee: the global sampling rate, steps and σ
        assert two["privacy"] == one.privacy and two["privacy"]["epsilon"] <= 8.0


def test_the_comparison_sees_a_different_run(data, two_process_runs, tmp_path):
    """The tolerance above is tight enough to tell runs apart: another shuffling seed fails it."""
    train(TrainConfig(**_cfg(data, seed=1), output_dir=str(tmp_path / "other")), progress=False)
    a, b = _delta(tmp_path / "other"), _delta(two_process_runs / "taft")
    assert max_rel_err(_flat(b), _flat(a)) > 100 * TOL


def _cli_args(data, out: Path) -> list[str]:
    d, t, _ = data
    return ["train", "--model", "tiny-bert", "--data", str(d), "--test-file", str(t), "--head-init", "random",
            "--epochs", "1", "--max-train", "40", "--batch-size", "8", "--threads", "1", "--output-dir", str(out)]


def test_a_rank_killed_mid_epoch_fails_the_run_and_writes_nothing(data, tmp_path):
    out = tmp_path / "runs" / "killed"
    proc = _torchrun("kill", *_cli_args(data, out))
    assert proc.returncode != 0
    assert not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == []  # no staging folder left behind either


def test_torchrun_restart_after_a_killed_rank_completes_the_run(data, tmp_path):
    out = tmp_path / "runs" / "restarted"
    proc = _torchrun("kill", *_cli_args(data, out), restarts=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert verify_run(out)["files"]
    assert json.loads((out / "results.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["restarted"]


@pytest.mark.parametrize(("mode", "what"), [("mismatch", "config and data and model weights"),
                                             ("otherdata", "data")])
def test_ranks_that_differ_are_refused(mode, what, data, tmp_path):
    """A seed differs (it also picks the validation split and the head's init), or a node's copy of the data."""
    other = data[0].parent / "other" / data[0].name
    other.parent.mkdir(exist_ok=True)
    other.write_text("\n".join(["1 a sentence only rank 1 has", *LINES[1:]]) + "\n")
    out = tmp_path / "mismatch"
    proc = _torchrun(mode, *_cli_args(data, out))
    assert proc.returncode != 0 and not out.exists()
    assert f"taft: error: rank 1 runs with another {what} than rank 0" in proc.stderr
    assert "/taft/" not in proc.stderr  # no traceback through taft (torchrun's launcher prints its own)


def test_two_nodes_meeting_at_a_rendezvous_endpoint_train_what_one_process_does(data, tmp_path):
    """The several-machines command, as two "nodes" of one process each on this machine (c10d rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TAFT_DIST_TIMEOUT_S": "120"}
    args = [*_cli_args(data, tmp_path / "nodes"), "--optimizer", "sgd", "--lr", "1e-2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend",
           "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "taft-test", "-m", "taft", *args]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert main([*_cli_args(data, tmp_path / "one"), "--optimizer", "sgd", "--lr", "1e-2"]) == 0
    assert json.loads((tmp_path / "nodes" / "results.json").read_text())["world_size"] == 2
    assert max_rel_err(_flat(_delta(tmp_path / "nodes")), _flat(_delta(tmp_path / "one"))) <= TOL


# -- without processes ----------------------------------------------------------------------------------------------
def test_devices_of_ranks():
    two = Ranks(rank=1, world=2, local_rank=1)
    assert device_for("cuda", two) == "cuda:1" and device_for("cpu", two) == "cpu"
    assert device_for("cuda:3", Ranks()) == "cuda:3"
    with pytest.raises(DistributedError, match="use --device cuda"):
        device_for("cuda:0", two)
    with pytest.raises(DistributedError, match="cpu \\(gloo\\) or cuda \\(nccl\\)"):
        device_for("mps", two)


def test_a_rank_holds_every_world_th_example_of_a_batch():
    assert owned(7, Ranks(rank=1, world=3)) == [1, 4]
    items = [{"h": torch.full((n, 2), float(i))} for i, n in zip((1, 4), (2, 3), strict=True)]
    shard = RankShard(FeatureCache(items), [1, 4], lengths=[5, 2, 1, 1, 3, 2, 2])
    assert len(shard) == 7 and shard.lengths[4] == 3
    assert held(shard, [6, 4, 0, 1]) == [4, 1]
    assert shard.collate([4]).h.primal[0, 0, 0] == 4.0
    cache = FeatureCache(items)
    assert shard_view(cache, 2, Ranks()) is cache and held(cache, [3, 1]) == [3, 1]
    assert on_rank0(lambda: 5, Ranks()) == 5


def test_other_commands_are_refused_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["search", "--model", "tiny-bert"]) == 2
    assert "torchrun runs `taft train` only" in capsys.readouterr().err


def test_a_bad_timeout_is_refused_before_joining(monkeypatch):
    from taft.train.distributed import joined

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TAFT_DIST_TIMEOUT_S", "soon")
    with pytest.raises(DistributedError, match="TAFT_DIST_TIMEOUT_S='soon'"), joined("cpu"):
        pass
