from __future__ import annotations

import json

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
