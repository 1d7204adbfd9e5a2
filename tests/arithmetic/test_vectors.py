"""Task vectors: the algebra's invariants, origin checks and the file format."""

from __future__ import annotations

import pytest
import torch

from taft.arithmetic import (
    TaskVector,
    TaskVectorError,
    apply,
    combine,
    cosine_matrix,
    load_task_vector,
    save_task_vector,
    task_vector,
)
from taft.delta import subtract


def _named(seed: int, shapes=(("a.weight", (4, 3)), ("a.bias", (4,)), ("b.weight", (2, 4)))) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes}


def _tv(seed: int, mode: str = "nonlinear", fp: str = "base0", task: str = "") -> TaskVector:
    return TaskVector(_named(seed), mode, fp, task or f"t{seed}")


def test_task_vector_is_finetuned_minus_base():
    base, ft = _named(0), _named(1)
    tv = task_vector(ft, base, mode="nonlinear", base_fingerprint="x", task="sst2")
    for n in base:
        assert torch.equal(tv.tensors[n], ft[n] - base[n])


def test_alpha_zero_gives_base_exactly():
    base = _named(0)
    merged = apply(base, [_tv(1), _tv(2)], 0.0)
    assert all(torch.equal(merged[n], base[n]) for n in base)


def test_add_then_subtract_gives_base_back():
    base, tv = _named(0), _tv(1)
    back = subtract(apply(base, [tv], 1.0), tv.tensors)
    for n in base:
        assert (back[n] - base[n]).abs().max().item() <= 1e-12


def test_combine_is_the_weighted_sum():
    a, b = _tv(1), _tv(2)
    out = combine([a, b], [0.3, -2.0])
    for n in out:
        assert torch.allclose(out[n], 0.3 * a.tensors[n] - 2.0 * b.tensors[n], rtol=0, atol=1e-14)


def test_cosine_matrix_symmetric_unit_diagonal():
    vs = [_tv(i) for i in range(4)]
    m = torch.tensor(cosine_matrix(vs), dtype=torch.float64)
    assert torch.equal(m, m.T)
    assert torch.equal(torch.diagonal(m), torch.ones(4, dtype=m.dtype))
    # one entry by hand
    a, b = vs[0].tensors, vs[2].tensors
    va, vb = torch.cat([a[n].flatten() for n in a]), torch.cat([b[n].flatten() for n in b])
    assert abs(m[0, 2].item() - float(va @ vb / (va.norm() * vb.norm()))) < 1e-12


def test_other_base_refused_unless_asked():
    with pytest.raises(TaskVectorError, match="another base"):
        combine([_tv(1), _tv(2, fp="other")], 1.0)
    combine([_tv(1), _tv(2, fp="other")], 1.0, allow_mixed=True)


def test_mixed_modes_refused_unless_asked():
    with pytest.raises(TaskVectorError, match="different spaces"):
        combine([_tv(1, mode="nonlinear"), _tv(2, mode="ntk")], 1.0)
    with pytest.raises(TaskVectorError):
        cosine_matrix([_tv(1, mode="ntk"), _tv(2, mode="linear-layers")])
    combine([_tv(1, mode="nonlinear"), _tv(2, mode="ntk")], 1.0, allow_mixed=True)


def test_save_load_roundtrip_and_tamper(tmp_path):
    tv = _tv(3, mode="ntk", task="trec")
    tv.info["lr"] = "1e-4"
    path = save_task_vector(tv, tmp_path / "tv.safetensors")
    back = load_task_vector(path)
    assert (back.mode, back.task, back.base_fingerprint, back.info) == ("ntk", "trec", "base0", {"lr": "1e-4"})
    assert all(torch.equal(back.tensors[n], tv.tensors[n]) for n in tv.tensors)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    t = load_file(str(path))
    t["a.bias"] = t["a.bias"] + 1.0
    save_file(t, str(path), metadata=meta)
    with pytest.raises(TaskVectorError, match="content hashes"):
        load_task_vector(path)
