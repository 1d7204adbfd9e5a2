"""MkDocs hook: pages generated at build time, never typed by hand.

* ``reference/cli.md``: every ``taft`` command, its help and its options, read from the Typer app itself;
* ``results/*.md``: each benchmark's markdown report (``benchmarks/results/NAME.md``, which the benchmark script
  writes from its JSON: ``python benchmarks/NAME.py --report``) and its plot, with an index page;
* ``changelog.md``: ``CHANGELOG.md`` at the repository root (one source for both).

The API reference (``reference/api.md``) lists ``taft.__all__``: the placeholder ``{{ taft.__all__ }}`` is replaced
by one mkdocstrings block per exported name.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _results() -> list[Path]:
    return sorted(RESULTS.glob("*.md"))


def _title(md: Path) -> str:
    first = md.read_text().lstrip().splitlines()[0]
    return first.lstrip("# ").strip() if first.startswith("#") else md.stem


def on_config(config):
    """The Results section lists every report found in ``benchmarks/results``."""
    pages = [{"Overview": "results/index.md"}] + [{md.stem: f"results/{md.stem}.md"} for md in _results()]
    for i, item in enumerate(config["nav"]):
        if isinstance(item, dict) and "Results" in item:
            config["nav"][i] = {"Results": pages}
    return config


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "reference/cli.md", content=cli_reference()))
    files.append(File.generated(config, "changelog.md", content=(ROOT / "CHANGELOG.md").read_text()))
    index = ["# Results", "", "Every table here is a benchmark's own report, written from its JSON by the committed "
             "script (`python benchmarks/NAME.py --report` where the script has one); the device, date and command "
             "that produced each number are in the report.", "", "| report | file |", "|---|---|"]
    for md in _results():
        text = md.read_text()
        # links among the reports and to their plots stay valid; links to anything else point at the repository
        text = re.sub(r"\[([^\]]*)\]\((?!https?://|#)([^)]+)\)", _link, text)
        png = md.with_suffix(".png")
        if png.is_file():
            text += f"\n![{md.stem}]({png.name})\n"
            files.append(File.generated(config, f"results/{png.name}", abs_src_path=str(png)))
        files.append(File.generated(config, f"results/{md.stem}.md", content=text))
        index.append(f"| [{_title(md)}]({md.stem}.md) | `benchmarks/results/{md.name}` |")
    files.append(File.generated(config, "results/index.md", content="\n".join(index) + "\n"))
    return files


def _link(m: re.Match) -> str:
    text, target = m.group(1), m.group(2)
    name = target.split("/")[-1]
    if (RESULTS / name).is_file() and name.endswith((".md", ".png")):
        return f"[{text}]({name})"
    return f"{text} (`benchmarks/results/{target}`)"  # a file of the repository, not a page of the site


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "{{ taft.__all__ }}" in markdown:
        import taft

        blocks = "\n\n".join(f"::: taft.{name}" for name in taft.__all__ if name != "__version__")
        markdown = markdown.replace("{{ taft.__all__ }}", blocks)
    return markdown


# -- the CLI reference --------------------------------------------------------------------------------------
def cli_reference() -> str:
    import typer

    from taft.cli import app

    root = typer.main.get_command(app)
    lines = ["# CLI reference", "", "Generated from the `taft` command itself (`taft COMMAND --help` prints the "
             "same). Every `taft train` option is a field of `taft.config.TrainConfig`; `--config FILE` reads them "
             "from YAML or JSON and flags override it.", ""]
    for path, cmd in _walk(root, ["taft"]):
        lines += _command(path, cmd)
    return "\n".join(lines) + "\n"


def _walk(cmd, path: list[str]):
    if hasattr(cmd, "commands"):
        if len(path) > 1:
            yield path, cmd
        for name in sorted(cmd.commands):
            yield from _walk(cmd.commands[name], [*path, name])
    else:
        yield path, cmd


def _command(path: list[str], cmd) -> list[str]:
    name = " ".join(path)
    out = [f"## `{name}`", "", (cmd.help or "").strip().split("\n\n")[0], ""]
    if hasattr(cmd, "commands"):
        return out + ["Subcommands: " + ", ".join(f"`{n}`" for n in sorted(cmd.commands)), ""]
    arguments = [p.name.upper() for p in cmd.params if p.param_type_name == "argument"]
    options = any(p.param_type_name == "option" for p in cmd.params)
    out += ["```", " ".join([name, *arguments, *(["[OPTIONS]"] if options else [])]), "```", ""]
    rows = []
    for p in cmd.params:
        if p.param_type_name == "argument":
            rows.append((p.name.upper(), "", _clean(getattr(p, "help", "") or "")))
        elif p.name != "help":
            default = "" if p.default is None or callable(p.default) or p.is_flag and p.default is False \
                else f"`{p.default}`"
            rows.append((", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts]), default, _clean(p.help or "")))
    if rows:
        out += ["| option | default | meaning |", "|---|---|---|"]
        out += [f"| {a if a.startswith('`') else f'`{a}`'} | {d} | {h} |" for a, d, h in rows]
        out.append("")
    return out


def _clean(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")
