from __future__ import annotations

import json

import pytest

from taft.cli import main


def test_check_json_reports_errors_and_fallbacks(capsys):
    assert main(["check", "tiny-bert", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"max_rel_err_primal", "max_rel_err_tangent", "fallback_modules"}
    assert out["max_rel_err_tangent"] <= 1e-10 and out["fallback_modules"] == []


def test_check_fails_when_over_tolerance(monkeypatch, capsys):
    import torch

    monkeypatch.setitem(__import__("taft.check").check.TOLERANCE, torch.float64, 0.0)
    assert main(["check", "tiny-bert", "--scope", "last:1"]) == 1


def test_check_float32_and_table(capsys):
    assert main(["check", "tiny-bert", "--dtype", "float32"]) == 0
    assert "tiny-bert" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_check_half_precision_against_float64(dtype, monkeypatch, capsys):
    """Half precision is compared with the float64 model of the same rounded weights: errors well above float64's
    and under the stated tolerance; a tangent 10 % off fails it."""
    from taft.rules import gelu

    assert main(["check", "tiny-vit", "--dtype", dtype, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 1e-5 < out["max_rel_err_tangent"] <= out["tolerance"]
    real = gelu.gelu_dual

    def off(ctx, x, approximate="none"):
        y = real(ctx, x, approximate)
        return y if y.tangent is None else type(y)(y.primal, y.tangent * 1.1)

    monkeypatch.setattr(gelu, "gelu_dual", off)
    monkeypatch.setattr(__import__("taft.models.timm_vit").models.timm_vit, "gelu_dual", off)
    assert main(["check", "tiny-vit", "--dtype", dtype, "--json"]) == 1


def test_unknown_model_and_bad_scope_are_clear_errors(capsys):
    assert main(["check", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["check", "tiny-bert", "--scope", "re:zzz"]) == 2
    assert "matches no parameter" in capsys.readouterr().err


def test_check_minilm_real_weights_float64(capsys):
    """The acceptance check: MiniLM with its real weights, every parameter linearized, float64."""
    assert main(["check", "minilm", "--dtype", "float64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["arch"] == "hf-bert" and out["linearized"] == 101
    assert out["max_rel_err_primal"] <= 1e-10 and out["max_rel_err_tangent"] <= 1e-10 and out["fallback_modules"] == []


def test_check_every_tiny_family(capsys):
    models = ["tiny-vit", "tiny-hf-vit", "tiny-clip-vision", "tiny-open-clip"]
    assert main(["check", *models, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in out] == models and all(r["passed"] and not r["fallback_modules"] for r in out)
