"""Δw safetensors checkpoints: round trip, metadata, and refusals that leave stored files intact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from taft.checkpoint import CheckpointError, base_fingerprint, load_delta, read_delta, save_delta
from taft.tangent_model import TangentModel
from taft.zoo import tiny_bert
from tests.helpers import randomize_delta


def _tm(scope="last:1", seed=0, **kw):
    return TangentModel(tiny_bert(seed).eval(), scope, **kw)


def test_round_trip_holds_only_linearized_tensors(tmp_path):
    tm = _tm()
    randomize_delta(tm)
    path = save_delta(tm, tmp_path / "d.safetensors", extra_metadata={"task": "sst2"})
    tensors, meta = read_delta(path)
    assert sorted(tensors) == sorted(tm.linearized)
    assert meta["arch"] == "hf-bert" and meta["scope"] == "last:1" and meta["user.task"] == "sst2"
    assert json.loads(meta["linearized"]) == tm.linearized
    assert meta["base_fingerprint"] == base_fingerprint(tm)
    fresh = _tm()
    load_delta(fresh, path)
    for n, d in tm.delta_dict().items():
        assert torch.equal(fresh.delta_dict()[n], d)


def test_different_base_is_refused(tmp_path):
    tm = _tm(seed=0)
    path = save_delta(tm, tmp_path / "d.safetensors")
    with pytest.raises(CheckpointError, match="different base model"):
        load_delta(_tm(seed=1), path)
    with pytest.raises(CheckpointError, match="different base model"):
        load_delta(_tm(reinit=True), path)


def test_different_scope_is_refused(tmp_path):
    path = save_delta(_tm("last:1"), tmp_path / "d.safetensors")
    with pytest.raises(CheckpointError, match="different parameter set.*scope='last:1'"):
        load_delta(_tm("attn"), path)


def test_missing_or_misshaped_or_nan_tensors_are_refused(tmp_path):
    tm = _tm()
    path = save_delta(tm, tmp_path / "d.safetensors")
    tensors, meta = read_delta(path)
    name = tm.linearized[0]
    bad = dict(tensors)
    bad[name] = torch.zeros(3, 3)
    save_file(bad, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=f"{name}.*shape"):
        load_delta(tm, tmp_path / "shape.safetensors")
    bad[name] = torch.full_like(tensors[name], float("nan"))
    save_file(bad, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="NaN"):
        load_delta(tm, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="missing="):
        tm.load_delta({n: t for n, t in tensors.items() if n != name})
    # Nothing was half-loaded: Δw is still exactly zero.
    assert all(torch.count_nonzero(d) == 0 for d in tm.delta_dict().values())


def test_wrong_dtype_or_device_is_refused():
    tm = _tm()
    d = {n: t.detach().double() for n, t in tm.delta_dict().items()}
    with pytest.raises(ValueError, match="dtype torch.float64.*convert"):
        tm.load_delta(d)
    d = {n: torch.empty(t.shape, device="meta") for n, t in tm.delta_dict().items()}
    with pytest.raises(ValueError, match="is on meta"):
        tm.load_delta(d)


def test_foreign_or_missing_files(tmp_path):
    tm = _tm()
    with pytest.raises(CheckpointError, match="no file"):
        load_delta(tm, tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_delta(tm, tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="no taft metadata"):
        load_delta(tm, tmp_path / "plain.safetensors")


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    tm = _tm()
    randomize_delta(tm)
    path = save_delta(tm, tmp_path / "d.safetensors")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("taft.checkpoint.save_file", boom)
    with pytest.raises(OSError):
        save_delta(_tm(), path)
    assert path.read_bytes() == before


def test_changed_bytes_are_refused_even_when_finite(tmp_path):
    import struct

    tm = _tm()
    randomize_delta(tm)
    path = save_delta(tm, tmp_path / "d.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-4:] = struct.pack("<f", 0.5)  # the last element of the last tensor: still a finite float
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match the content hash"):
        read_delta(path)
    with pytest.raises(CheckpointError, match="does not match the content hash"):
        load_delta(_tm(), path)


def test_nan_delta_is_not_saved(tmp_path):
    tm = _tm()
    with torch.no_grad():
        next(iter(tm.delta_dict().values())).fill_(float("nan"))
    with pytest.raises(CheckpointError, match="NaN or inf"):
        save_delta(tm, tmp_path / "d.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_format_1_files_without_content_hashes_still_load(tmp_path):
    tm = _tm()
    randomize_delta(tm)
    tensors, meta = read_delta(save_delta(tm, tmp_path / "d.safetensors"))
    old = {k: v for k, v in meta.items() if k not in ("content_sha256", "run_id")} | {"format": "taft-delta/1"}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=old)
    fresh = _tm()
    assert load_delta(fresh, tmp_path / "old.safetensors")["format"] == "taft-delta/1"
    assert all(torch.equal(fresh.delta_dict()[n], d) for n, d in tm.delta_dict().items())
    save_file(tensors, str(tmp_path / "new.safetensors"), metadata=old | {"format": "taft-delta/2"})
    with pytest.raises(CheckpointError, match="no valid content hash"):
        read_delta(tmp_path / "new.safetensors")


def test_nonlinear_and_tangent_deltas_are_not_interchangeable(tmp_path):
    """An NLFT Δw (the same parameters trained through the model itself) computes a different function from a
    TAFT Δw: each loads only into its own kind of model; format 2 files (no kind recorded) still load."""
    tm, nl = _tm(), _tm(linear=False)
    randomize_delta(tm)
    randomize_delta(nl, seed=1)
    taft_file, nlft_file = save_delta(tm, tmp_path / "taft.safetensors"), save_delta(nl, tmp_path / "nlft.safetensors")
    assert read_delta(taft_file)[1]["kind"] == "tangent" and read_delta(nlft_file)[1]["kind"] == "nonlinear"
    with pytest.raises(CheckpointError, match="holds a nonlinear Δw.*linear=False"):
        load_delta(_tm(), nlft_file)
    with pytest.raises(CheckpointError, match="holds a tangent Δw"):
        load_delta(_tm(linear=False), taft_file)
    load_delta(_tm(linear=False), nlft_file)
    tensors, meta = read_delta(nlft_file)
    v2 = {k: v for k, v in meta.items() if k not in ("kind", "dtype", "backbone_fingerprint", "head_fingerprint")}
    save_file(tensors, str(tmp_path / "v2.safetensors"), metadata=v2 | {"format": "taft-delta/2"})
    load_delta(_tm(), tmp_path / "v2.safetensors")  # nothing recorded, nothing to check


def test_fingerprints_split_backbone_and_head(tmp_path):
    """Two models with one backbone and different heads share the backbone fingerprint, not the head's or the
    whole's; the parts partition the base (changing a block weight changes the backbone's only)."""
    from taft.models.classifier import Classifier

    def build(head_shift=0.0, block0_shift=0.0):
        torch.manual_seed(0)
        m = Classifier(tiny_bert(0).eval(), 3)
        with torch.no_grad():
            m.head.weight.add_(head_shift)
            m.backbone.encoder.layer[0].output.dense.weight.add_(block0_shift)
        return TangentModel(m, "last:1")

    a, b, c = build(), build(head_shift=1.0), build(block0_shift=1.0)
    assert base_fingerprint(a, "backbone") == base_fingerprint(b, "backbone")
    assert base_fingerprint(a, "head") != base_fingerprint(b, "head")
    assert base_fingerprint(a) != base_fingerprint(b)
    assert base_fingerprint(a, "backbone") != base_fingerprint(c, "backbone")
    assert base_fingerprint(a, "head") == base_fingerprint(c, "head")
    meta = read_delta(save_delta(a, tmp_path / "d.safetensors"))[1]
    assert meta["backbone_fingerprint"] == base_fingerprint(a, "backbone") and meta["dtype"] == "float32"
