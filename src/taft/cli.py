"""The ``taft`` command line. Each subcommand calls one library function."""

from __future__ import annotations

import json
import sys

import typer
from typer._click import exceptions as click_exc

from taft.errors import TaftError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Tangent fine-tuning of pretrained transformers.")


@app.callback()
def _root() -> None:
    """taft: tangent fine-tuning, exact one-pass JVP engine."""


@app.command()
def check(
    models: list[str] = typer.Argument(..., help="minilm, tiny-vit, tiny-hf-vit, tiny-clip-vision, tiny-open-clip"),
    scope: str = typer.Option("all", help="parameters to linearize: all | last[:k] | attn | head | patterns"),
    dtype: str = typer.Option("float64", help="float64 | float32"),
    batch: int = typer.Option(3, min=1),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (a list for several models)"),
    pretrained: bool = typer.Option(True, help="load pretrained weights where the model has them"),
) -> None:
    """Compare the closed-form tangent with the torch.func reference on random inputs."""
    from taft.check import check_model
    from taft.zoo import load_model

    reports = []
    for name in models:
        model = load_model(name, pretrained=pretrained)
        reports.append(check_model(model, name=name, scope=scope, dtype=dtype, batch=batch, seed=seed))
    if as_json:
        out = [r.to_dict() for r in reports]
        typer.echo(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"taft check ({dtype}, scope={scope})")
        for col in ("model", "arch", "tensors", "primal rel err", "tangent rel err", "tol", "fallback", "ok"):
            table.add_column(col, no_wrap=col in ("model", "arch"))
        for r in reports:
            table.add_row(r.model, r.arch, str(r.linearized), f"{r.max_rel_err_primal:.2e}",
                          f"{r.max_rel_err_tangent:.2e}", f"{r.tolerance:.0e}",
                          ", ".join(r.fallback_modules) or "none", "yes" if r.passed else "NO")
        Console().print(table)
    if not all(r.passed for r in reports):
        raise typer.Exit(1)


def main(argv: list[str] | None = None) -> int:
    """Entry point; ``main([...])`` runs a command in-process and returns its exit code."""
    cmd = typer.main.get_command(app)
    try:
        rv = cmd.main(args=argv if argv is not None else sys.argv[1:], prog_name="taft", standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        return 1
    except click_exc.ClickException as e:
        e.show()
        return e.exit_code
    except TaftError as e:
        typer.echo(f"taft: error: {e}", err=True)
        return 2
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
