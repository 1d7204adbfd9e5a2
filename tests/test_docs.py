"""The documentation: the site builds strictly offline, the API reference lists ``taft.__all__``, the results pages
come from ``benchmarks/results``, and every ``taft`` command shown in the README or the docs parses."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import typer.main

import taft
from taft.cli import app, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT,
                       capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin",
                                                            "HOME": str(out)}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_site_builds_strictly_with_generated_pages(site):
    cli = (site / "reference" / "cli" / "index.html").read_text()
    for command in ("taft train", "taft shards forget", "taft arithmetic add", "--dp-epsilon", "--prediction"):
        assert command in cli, command
    results = sorted(p.stem for p in (ROOT / "benchmarks" / "results").glob("*.md"))
    assert results and all((site / "results" / r / "index.html").is_file() for r in results)
    assert "Superseded results" in (site / "changelog" / "index.html").read_text()


def test_api_reference_lists_the_public_api(site):
    html = (site / "reference" / "api" / "index.html").read_text()
    for name in taft.__all__:
        if name != "__version__":
            assert f'id="taft.{name}"' in html or re.search(rf'id="taft\.[\w.]*\.{name}"', html), name
    for name in taft.__all__:
        assert hasattr(taft, name), name


def _commands(text: str) -> list[str]:
    """``taft …`` lines in code blocks (fenced or indented), continuation lines joined, comments dropped."""
    out, fenced = [], False
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("```"):
            fenced = not fenced
        code = fenced or line.startswith("    ")
        s = line.strip()
        if code and re.match(r"(taft|torchrun\b.*-m taft)\s", s):
            while s.endswith("\\") and i + 1 < len(lines):
                i += 1
                s = s[:-1] + " " + lines[i].strip()
            out.append(s)
        i += 1
    return out


def _parse(argv: list[str]) -> None:
    """Parse a command line as ``taft`` would, down to the leaf command, without running it."""
    cmd = typer.main.get_command(app)
    try:
        ctx = cmd.make_context("taft", argv)
        while hasattr(cmd, "commands"):
            name, cmd, rest = cmd.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
            ctx = cmd.make_context(name, rest, parent=ctx)
    except typer.Exit as e:  # --help: printed and stopped, which is a successful parse
        assert e.exit_code == 0


def test_every_command_in_the_docs_parses():
    seen = 0
    for page in PAGES:
        for line in _commands(page.read_text()):
            argv = shlex.split(line, comments=True)
            if argv[0] == "torchrun":
                argv = argv[argv.index("taft") :]  # the launcher's own flags are torchrun's
            if argv[1:2] == ["--version"]:
                continue
            try:
                _parse(argv[1:])
            except Exception as e:  # noqa: BLE001 — report which page and line
                pytest.fail(f"{page.relative_to(ROOT)}: `{line}` does not parse: {e}")
            seen += 1
    assert seen >= 20, seen


def test_the_parse_check_can_fail():
    with pytest.raises(Exception, match="No such option"):
        _parse(["train", "--no-such-flag", "1"])
    with pytest.raises(Exception, match="No such command"):
        _parse(["shards", "frobnicate"])


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"taft {taft.__version__}"
