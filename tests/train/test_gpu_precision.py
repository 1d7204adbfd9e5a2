"""``taft train --dtype bfloat16`` on a CUDA GPU (``-m gpu``): the model in bf16, Δw a float32 master copy, and the
run folder reloads into the same accuracy. Generated data (no files needed beside the repository)."""

from __future__ import annotations

import json

import pytest
import torch

from taft.cli import main


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["taft", "nlft"])
def test_bf16_training_on_gpu(tmp_path, capsys, method):
    words = ["bad", "fine", "good"]
    lines = [f"{i % 3} sentence number {i} is {words[i % 3]} and {words[(i * 7) % 3]}" for i in range(240)]
    (tmp_path / "d.txt").write_text("\n".join(lines[:180]) + "\n")
    (tmp_path / "t.txt").write_text("\n".join(lines[180:]) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-bert", "--data", str(tmp_path / "d.txt"), "--test-file",
                 str(tmp_path / "t.txt"), "--method", method, "--head-init", "random", "--epochs", "2",
                 "--device", "cuda", "--dtype", "bfloat16", "--output-dir", str(out)]) == 0
    from safetensors.torch import load_file

    delta = load_file(str(out / "delta.safetensors"))
    assert all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in delta.values())
    res = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == res["test_acc"]
