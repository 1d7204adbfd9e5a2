"""The ``taft`` command line. Each subcommand calls one library function."""

from __future__ import annotations

import json
import sys
import warnings

import typer
from typer._click import exceptions as click_exc

from taft.config import STORE_DEFAULTS, STORE_METHOD_DEFAULTS
from taft.console import console
from taft.errors import TaftError

# Library chatter that says nothing to a taft user (a deprecation inside an upstream import).
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated")


app = typer.Typer(add_completion=False, no_args_is_help=True, help="Tangent fine-tuning of pretrained transformers.")


def _print_version(value: bool) -> None:
    if value:
        from taft._version import __version__

        typer.echo(f"taft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print taft's version and exit")) -> None:
    """taft: tangent fine-tuning, exact one-pass JVP engine."""


@app.command()
def check(
    models: list[str] = typer.Argument(..., help="minilm, tiny-vit, tiny-hf-vit, tiny-clip-vision, tiny-open-clip"),
    scope: str = typer.Option(
        "all", help="parameters to linearize: all | last[:k] | attn | attn+bias | bias | norm | head | patterns"
    ),
    dtype: str = typer.Option("float64", help="float64 | float32 | bfloat16 | float16"),
    batch: int = typer.Option(3, min=1),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (a list for several models)"),
    pretrained: bool = typer.Option(True, help="load pretrained weights where the model has them"),
) -> None:
    """Compare the closed-form tangent with the torch.func reference on random inputs."""
    from taft.check import DTYPES, check_model
    from taft.config import ConfigError, check_scope_syntax
    from taft.zoo import load_model

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: not supported by taft check; use one of {sorted(DTYPES)}")
    check_scope_syntax(scope)
    reports = []
    for name in models:
        model = load_model(name, pretrained=pretrained)
        reports.append(check_model(model, name=name, scope=scope, dtype=dtype, batch=batch, seed=seed))
    if as_json:
        out = [r.to_dict() for r in reports]
        typer.echo(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    else:
        from rich.table import Table

        table = Table(title=f"taft check ({dtype}, scope={scope})")
        for col in ("model", "arch", "tensors", "primal rel err", "tangent rel err", "tol", "fallback", "ok"):
            table.add_column(col, no_wrap=col in ("model", "arch"))
        for r in reports:
            table.add_row(r.model, r.arch, str(r.linearized), f"{r.max_rel_err_primal:.2e}",
                          f"{r.max_rel_err_tangent:.2e}", f"{r.tolerance:.0e}",
                          ", ".join(r.fallback_modules) or "none", "yes" if r.passed else "NO")
        console().print(table)
    if not all(r.passed for r in reports):
        raise typer.Exit(1)


def _config_command(name: str, cls, run, help: str, extra: list | None = None, on=None,
                    defaults: dict | None = None, method_defaults: dict | None = None) -> None:
    """Register ``taft NAME`` with one ``--flag`` per field of the config dataclass ``cls`` (plus ``--config``).

    Flags default to ``None`` so that only what is typed overrides the ``--config`` file (or the defaults).
    ``extra``: further ``inspect.Parameter`` options, passed to ``run`` as keyword arguments. ``on``: the typer app
    to register on (default: the root). ``defaults``: this command's own defaults for some fields;
    ``method_defaults``: ``{method: {field: value}}``, defaults of one method only."""
    import dataclasses
    import inspect
    import typing
    from pathlib import Path

    hints = typing.get_type_hints(cls)
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
                                default=typer.Option(None, help="YAML/JSON file with these options"))]
    for f in dataclasses.fields(cls):
        base = typing.get_args(hints[f.name])[0] if typing.get_origin(hints[f.name]) else hints[f.name]
        if base is type(None):
            base = str
        default = (defaults or {}).get(f.name, f.default)
        default_txt = f"default: {default}" if default not in (dataclasses.MISSING, None) else ""
        by_method = {m: d[f.name] for m, d in (method_defaults or {}).items() if f.name in d}
        if by_method:
            default_txt = "default: " + ", ".join(f"{v:g} for {m}" for m, v in by_method.items()) + ", else by method"
        # "(default: …)", not "[default: …]": rich reads square brackets as markup and drops them from --help
        text = f.metadata.get("help", "") + (f" ({default_txt})" if default_txt else "")
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=base | None,
                                        default=typer.Option(None, help=text)))

    params += extra or []

    def command(**kwargs):
        from taft.config import from_dict, load_config, read_config_file

        path = kwargs.pop("config")
        options = {p.name: kwargs.pop(p.name) for p in extra or []}
        given = {k: v for k, v in kwargs.items() if v is not None}
        stored = read_config_file(path) if path and (defaults or method_defaults) else {}
        if defaults:
            given = {**{k: v for k, v in defaults.items() if k not in stored}, **given}
        cfg = load_config(cls, path, **given) if path else from_dict(cls, given)
        mine = {k: v for k, v in (method_defaults or {}).get(cfg.method, {}).items()
                if k not in given and k not in stored}
        run(dataclasses.replace(cfg, **mine) if mine else cfg, **options)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = help
    (on or app).command(name, help=help)(command)


def _run_train(cfg) -> None:
    from taft.train.distributed import from_env
    from taft.train.loop import train
    from taft.train.report import print_results

    result = train(cfg)
    if from_env().main:  # under torchrun: one table, from rank 0
        print_results([result])


_config_command("train", __import__("taft.config", fromlist=["TrainConfig"]).TrainConfig, _run_train,
                "Fine-tune a model (TAFT or a baseline) and print a results table.")


def _run_search(cfg, grid: list[str] | None = None, seeds: str | None = None) -> None:
    from taft.config import ConfigError
    from taft.train.report import print_search
    from taft.train.search import parse_grid, search

    try:
        seed_list = [int(s) for s in seeds.split(",")] if seeds else None
    except ValueError:
        raise ConfigError(f"--seeds {seeds!r}: write comma-separated integers, e.g. 0,1,2") from None
    print_search(search(cfg, parse_grid(grid), seed_list))


def _search_options() -> list:
    import inspect

    return [
        inspect.Parameter("grid", inspect.Parameter.KEYWORD_ONLY, annotation=list[str] | None, default=typer.Option(
            None, help="FIELD=V1,V2,… (repeatable; the grid is their product). Default: the method's grid, "
                       "the same size for every method")),
        inspect.Parameter("seeds", inspect.Parameter.KEYWORD_ONLY, annotation=str | None, default=typer.Option(
            None, help="seeds of the chosen setting, e.g. 0,1,2 (the first selects; default: --seed)")),
    ]


_config_command("search", __import__("taft.config", fromlist=["TrainConfig"]).TrainConfig, _run_search,
                "Grid-search a method's hyperparameters on the validation split; score the choice on test once "
                "per seed (mean ± std).", extra=_search_options())


@app.command("eval")
def eval_cmd(
    run_dir: str = typer.Argument(..., help="output folder of `taft train` (config.yaml + delta.safetensors)"),
    data: str | None = typer.Option(None, help="evaluate on another dataset spec (same classes)"),
    split: str = typer.Option("test", help="val | test"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Evaluate a trained Δw: rebuild the base exactly, load the checkpoint, report accuracy."""
    from taft.train.evaluate import evaluate_run

    res = evaluate_run(run_dir, data=data, split=split)
    if as_json:
        typer.echo(json.dumps(res, indent=2))
        return
    limited = (f" of {res['available']}: max_eval={res['max_eval']} from the run's config"
               if res["examples"] < res["available"] else "")
    typer.echo(f"{res['split']} accuracy: {res['accuracy']:.4f} ({res['examples']} examples{limited}, "
               f"{res['method']} on {res['data']})")


# -- taft shards -------------------------------------------------------------------------------------------
shards_app = typer.Typer(no_args_is_help=True, help="Shard stores: train shards, compose them, forget examples "
                                                     "exactly, verify the store.")
app.add_typer(shards_app, name="shards")


def _option(name: str, annotation, default, help: str):
    """One extra keyword option of a config command (``_config_command(extra=...)``)."""
    import inspect

    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, help=help))


def _shards_train_options() -> list:
    from pathlib import Path

    opt = _option
    return [
        opt("store", Path, ..., "the store folder (created, or resumed with the same options)"),
        opt("shards", int, ..., "number of disjoint shards K (seeded per-id hash of the training set)"),
        opt("backend", str, "sequential", "sequential | batched (all shards at once, vmapped) | ray"),
        opt("ray_address", str | None, None, "Ray cluster address for --backend ray (default: a local instance)"),
        opt("chunk", int | None, None, "--backend batched: at most this many shards at a time (memory)"),
        opt("weights", str, "size", "composition weights: size | uniform | FILE (JSON {shard: weight})"),
    ]


def _run_shards_train(cfg, store, shards, backend, ray_address, chunk, weights) -> None:
    from taft.shards.create import train_store

    out = train_store(cfg, store, shards, backend=backend, ray_address=ray_address, chunk=chunk, weights=weights)
    console().print(f"trained {len(out['trained'])} shard(s) in {out['train_s']:.1f} s ({backend}); composed "
                    f"{len(out['shards'])} live shard(s) into {out['composed']}/ (`taft eval {out['composed']}`)")
    _print_privacy(out.get("privacy"))


_config_command("train", __import__("taft.config", fromlist=["TrainConfig"]).TrainConfig, _run_shards_train,
                "Split the training set into K disjoint shards, train one tangent model per shard from the same w0, "
                "and compose them (resumes an interrupted store).", extra=_shards_train_options(), on=shards_app,
                defaults=STORE_DEFAULTS, method_defaults=STORE_METHOD_DEFAULTS)


def _shards_search_options() -> list:
    from pathlib import Path

    opt = _option
    return [
        opt("shards", int, ..., "number of disjoint shards K (the split `taft shards train` makes)"),
        opt("grid", list[str] | None, None, "FIELD=V1,V2,… (repeatable; the grid is their product). Default: "
            "lr=1e-3,3e-3 × min_steps=none,100, the same for every method"),
        opt("select", str, "composed", "what is scored on validation: composed (TAFT, Model Soup) | vote (SISA)"),
        opt("store", Path | None, None, "then train this store with the chosen setting"),
        opt("output", Path | None, None, "write the grid, every point's validation accuracy and the choice (JSON)"),
        opt("chunk", int | None, None, "at most this many shards trained at once (memory)"),
    ]


def _run_shards_search(cfg, shards, grid, select, store, output, chunk) -> None:
    from taft.shards.search import search_store
    from taft.train.search import parse_grid

    out = search_store(cfg, shards, parse_grid(grid) or None, select=select, store=store, output=output,
                       chunk=chunk)
    console().print(f"chosen on validation ({select}): {out['chosen']} → {out['val']:.4f}")
    if "store" in out:
        console().print(f"trained the store: composed {len(out['store']['shards'])} shard(s) into "
                        f"{out['store']['composed']}/")


_config_command("search", __import__("taft.config", fromlist=["TrainConfig"]).TrainConfig, _run_shards_search,
                "Choose a store's training setting on validation (the same grid for every method): the composed "
                "model's or the vote's accuracy; optionally train the store with it.", extra=_shards_search_options(),
                on=shards_app, defaults=STORE_DEFAULTS, method_defaults=STORE_METHOD_DEFAULTS)


@shards_app.command("compose")
def shards_compose(
    store: str = typer.Option(..., help="the store folder"),
    weights: str | None = typer.Option(None, help="size | uniform | FILE (JSON {shard: weight}); default: the "
                                                   "store's last choice (size at first)"),
    exclude: list[int] | None = typer.Option(None, help="shard to leave out (repeatable)"),
) -> None:
    """Write the weighted average of the live shards' Δw (weights normalized to sum 1) as STORE/composed."""
    from taft.shards.composition import compose

    out = compose(store, weights=weights, exclude=exclude or [])
    console().print(f"composed shards {out['shards']} (weights {out['weights_rule']}) into {out['composed']}/")


@shards_app.command("forget")
def shards_forget(
    more_ids: list[str] | None = typer.Argument(None, metavar="[ID]...", help="example ids to forget"),
    store: str = typer.Option(..., help="the store folder"),
    ids: list[str] | None = typer.Option(None, help="example id to forget (repeatable; `--ids A B C` works too)"),
    ids_file: str | None = typer.Option(None, help="file with one example id per line"),
    retrain: bool = typer.Option(False, help="retrain the affected shards on their remaining examples (default: "
                                             "drop them from the composition)"),
    backend: str = typer.Option("sequential", help="--retrain: sequential | batched | ray"),
) -> None:
    """Forget training examples exactly: drop or retrain their shards, delete what was derived from them,
    recompose."""
    from pathlib import Path

    from taft.config import ConfigError
    from taft.shards.removal import forget

    wanted = [*(ids or []), *(more_ids or [])]
    if ids_file:
        path = Path(ids_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"--ids-file {path} does not exist")
        wanted += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    out = forget(store, wanted, retrain=retrain, backend=backend)
    what = "retrained" if retrain else "dropped"
    console().print(f"forgot {len(out['forgotten'])} example(s); shard(s) {out['shards']} {what}"
                    + (f" ({len(out['already_forgotten'])} already forgotten)" if out["already_forgotten"] else "")
                    + (f"; now empty: {out['empty_shards']}" if out["empty_shards"] else ""))
    if out.get("imported_dropped"):
        console().print(f"imported shard(s) {out['imported_dropped']} were dropped, not retrained (trained elsewhere: "
                        f"this store has no features of their examples)")
    if out.get("may_remain_in"):
        console().print(f"note: imported shard(s) {out['may_remain_in']} did not disclose their ids; if the "
                        f"example(s) were also among them, drop those shards (`taft shards drop --store {store} "
                        f"--shard K`)")


@shards_app.command("verify")
def shards_verify(store: str = typer.Option(..., help="the store folder"),
                  as_json: bool = typer.Option(False, "--json")) -> None:
    """Prove the store's state: hashes, no forgotten example in any live shard, composition, audit log."""
    from taft.shards.verification import verify

    report = verify(store)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        c = report["checked"]
        if report["ok"]:
            console().print(f"store OK: {c['live']} live of {c['shards']} shards, {c['forgotten']} forgotten "
                            f"example(s), composition of {len(c['composed'])} shard(s) verified, "
                            f"{c['audit_rows']} audit rows consistent")
        for p in report["problems"]:
            typer.echo(f"taft: problem: {p}", err=True)
    if not report["ok"]:
        raise typer.Exit(1)


@shards_app.command("status")
def shards_status(store: str = typer.Option(..., help="the store folder"),
                  as_json: bool = typer.Option(False, "--json"),
                  history: int = typer.Option(10, help="audit rows to show (the most recent)"),
                  ids: bool = typer.Option(False, "--ids", help="list every example id with its shard")) -> None:
    """The shards (status, examples, generation, validation accuracy), the composition and the history."""
    from rich.table import Table

    from taft.shards.report import status

    st = status(store)
    if not ids:
        st.pop("ids")
    if ids:
        for row in st["ids"]:
            typer.echo(f"{row['id']}\t{row['shard']}" + ("\tforgotten" if row["forgotten_in"] else ""))
        return
    if as_json:
        typer.echo(json.dumps(st, indent=2, default=str))
        return
    table = Table(title=f"taft shards: {st['store']} ({st['examples']} examples, {st['forgotten']} forgotten)")
    for col in ("shard", "status", "examples", "generation", "val acc", "ε", "origin", "file"):
        table.add_column(col, no_wrap=True)
    origins = {int(k): v for k, v in st["origins"].items()}
    for r in st["shards"]:
        eps = json.loads(r["privacy"])["epsilon"] if r.get("privacy") else None
        o = origins.get(r["shard"])
        origin = "train" if o is None else o["kind"] + ("" if o["ids"] else " (ids undisclosed)")
        table.add_row(str(r["shard"]), r["status"], str(r["examples"]), str(r["generation"]),
                      "—" if r["val_acc"] is None else f"{100 * r['val_acc']:.2f}",
                      "—" if eps is None else f"{eps:.3g}", origin, r["file"] or "—")
    console().print(table)
    if st["undisclosed"]:
        console().print(f"imported shard(s) {st['undisclosed']} did not disclose their ids: an example in them can "
                        f"only be forgotten by dropping the shard whole (`taft shards drop`)")
    _print_privacy(st["privacy"])
    comp = st["composed"]
    if st["unfinished"]:
        console().print(f"[bold red]unfinished:[/] {st['unfinished']}; composed/ is not served until then")
    else:
        console().print(f"composed: {comp['shards'] if comp else 'none'}" + (f" (weights {comp['weights_rule']})"
                                                                            if comp else ""))
    for a in st["history"][-history:]:
        console().print(f"  #{a['seq']} {a['time']} {a['action']} {a['outcome']} (request {a['request']})")


@shards_app.command("eval")
def shards_eval(store: str = typer.Option(..., help="the store folder"),
                split: str = typer.Option("test", help="val | test"),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """Accuracy of the composed model, the shard ensemble (mean output) and the majority vote (SISA)."""
    from taft.shards.report import evaluate_store

    res = evaluate_store(store, split)
    if as_json:
        typer.echo(json.dumps(res, indent=2))
        return
    console().print(f"{split} accuracy over {res['examples']} examples, {len(res['shards'])} live shards: composed "
                    f"{100 * res['composed']:.2f}, ensemble (mean output) {100 * res['ensemble_mean']:.2f}, "
                    f"majority vote {100 * res['vote']:.2f}")


@shards_app.command("add")
def shards_add(
    store: str = typer.Option(..., help="the store folder"),
    data: str = typer.Option(..., help="a .txt/.csv/.jsonl file of new training examples"),
    shards: int | None = typer.Option(None, help="number of new shards (default: the store's mean shard size)"),
    backend: str = typer.Option("sequential", help="sequential | batched | ray"),
    strict: bool = typer.Option(False, help="refuse (instead of skipping) examples already in the store, held "
                                            "out or forgotten earlier"),
) -> None:
    """Train new shards on examples the store has not seen (its w0 and options) and recompose."""
    from taft.shards.grow import _skip_text, add_data

    out = add_data(store, data, num_shards=shards, backend=backend, strict=strict, progress=True)
    console().print(f"added {out['added']} example(s) as shard(s) {out['shards']} in {out['train_s']:.1f} s"
                    + (f"; skipped: {_skip_text(out['skipped'])}" if any(out["skipped"].values()) else "")
                    + f"; composed {len(out['composed']['shards'])} live shard(s)")
    _print_privacy(out["composed"].get("privacy"))


@shards_app.command("export")
def shards_export(
    store: str = typer.Option(..., help="the store folder"),
    shard: int = typer.Option(..., help="the live shard to export"),
    out: str = typer.Option(..., help="the package folder to write (new)"),
    ids: bool = typer.Option(True, "--ids/--no-ids", help="--no-ids: keep the example ids here (the package holds "
                                                          "their count and SHA-256; importers can only drop it whole)"),
) -> None:
    """Write one shard as a self-contained, hashed package (safetensors + JSON manifest) another store can import."""
    from taft.shards.grow import export_shard

    res = export_shard(store, shard, out, ids=ids)
    console().print(f"exported shard {shard} ({res['shard']['examples']} examples, ids {res['ids']}) to "
                    f"{res['package']}/ (manifest SHA-256 {res['manifest_sha256']})")


@shards_app.command("import")
def shards_import(
    package: str = typer.Argument(..., help="the package folder (`taft shards export`)"),
    store: str = typer.Option(..., help="the store folder"),
) -> None:
    """Accept a shard package into this store if w0, options and classes match, and recompose."""
    from taft.shards.grow import import_shard

    out = import_shard(store, package)
    console().print(f"imported {package} as shard {out['shard']} ({out['examples']} examples, ids {out['ids']}); "
                    f"composed {len(out['composed']['shards'])} live shard(s)")
    if out["ids"] == "undisclosed":
        console().print(f"its ids were not disclosed: forgetting one of its examples means dropping it whole "
                        f"(`taft shards drop --store {store} --shard {out['shard']}`)")
    _print_privacy(out["composed"].get("privacy"))


@shards_app.command("drop")
def shards_drop(store: str = typer.Option(..., help="the store folder"),
                shard: int = typer.Option(..., help="an imported shard whose ids were not disclosed")) -> None:
    """Drop an imported shard whose ids were not disclosed (the only way to forget its examples) and recompose."""
    from taft.shards.grow import drop_shard

    out = drop_shard(store, shard)
    console().print(f"dropped shard {out['dropped']} ({out['examples']} examples); its file is deleted")


def _print_privacy(p: dict | None) -> None:
    if not p:
        return
    if p["composed"] is None:
        console().print(f"privacy: {p['note']}")
        return
    console().print(f"privacy: composed model (ε = {p['composed']['epsilon']:.3g}, δ = {p['composed']['delta']:g}) by "
                    f"parallel composition over disjoint shards; every release so far: ε ≤ "
                    f"{p['all_releases_epsilon']:.3g}" + (f" ({p['assumes']})" if p.get("assumes") else ""))


# -- taft arithmetic (task vectors) ------------------------------------------------------------------------
arithmetic_app = typer.Typer(no_args_is_help=True, help="Task arithmetic with task vectors of a shared encoder: "
                             "fine-tune, add, negate, disentangle, similarity.")
app.add_typer(arithmetic_app, name="arithmetic")

_OUT = typer.Option(..., "--output-dir", help="run folder to write (appears only when complete)")
_OVERWRITE = typer.Option(False, help="replace an existing run folder")


def _alphas(step: float, start: float, stop: float) -> list[float]:
    from taft.arithmetic.experiments import grid

    return grid(start, stop, step, name="--alpha-step")


def _floats(text: str, flag: str, example: str) -> list[float]:
    import math

    from taft.config import ConfigError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(x) and x > 0 for x in values):
        raise ConfigError(f"{flag} {text!r}: write positive numbers separated by commas, e.g. {example}")
    return values


def _echo(res: dict) -> None:
    from taft.train.rundir import finite_json

    typer.echo(json.dumps(finite_json(res), indent=2))


@arithmetic_app.command("finetune")
def arithmetic_finetune(
    task: str = typer.Option(..., help="sentence task (mr, sst2, sst5, subj, trec)"),
    mode: str = typer.Option("linear-layers", help="nonlinear | ntk | linear-layers | attn+bias | attn-block | "
                                                   "attn-block+bias | taft-last1"),
    lr: str = typer.Option("1e-4", help="AdamW learning rate, or a comma-separated grid chosen on validation"),
    epochs: int = typer.Option(1, min=1, help="length of the warm-up + cosine schedule"),
    lengths: str | None = typer.Option(None, help="comma-separated early-stopping points in epochs (≤ --epochs), "
                                                  "chosen on validation with the lr; default: --epochs"),
    model: str = typer.Option("minilm"),
    data_root: str | None = typer.Option(None, help="folder of the sentence-task files"),
    max_length: int = typer.Option(64, min=1),
    max_train: int | None = typer.Option(None, help="training sentences (seeded sample)"),
    max_eval: int | None = typer.Option(None, help="validation sentences (seeded sample)"),
    max_test: int | None = typer.Option(None, help="test sentences (seeded sample; default --max-eval)"),
    batch_size: int = typer.Option(32, min=1),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu"),
    output_dir: str = _OUT,
    overwrite: bool = _OVERWRITE,
) -> None:
    """Fine-tune one task vector (encoder only, frozen zero-shot head) and save it with its base and mode."""
    from taft.arithmetic.modes import get_mode
    from taft.arithmetic.runs import finetune_run
    from taft.arithmetic.suite import ArithmeticConfig

    get_mode(mode)
    cfg = ArithmeticConfig(model=model, tasks=task, data_root=data_root, max_length=max_length, max_train=max_train,
                           max_eval=max_eval, max_test=max_test, batch_size=batch_size, seed=seed, device=device)
    _echo(finetune_run(cfg, task, mode, output_dir, lr=_floats(lr, "--lr", "3e-5,1e-4,3e-4"),
                       epochs=epochs, lengths=_floats(lengths, "--lengths", "0.5,1,2") if lengths else None,
                       overwrite=overwrite))


@arithmetic_app.command("add")
def arithmetic_add(
    vectors: list[str] = typer.Argument(..., help="task vectors (files or finetune folders), one per task"),
    alpha_step: float = typer.Option(0.05, help="α grid 0, step, ..., 1, chosen on validation; the step must "
                                                "divide 1 (0.05, 0.1, 0.25, ...; 0.3 is refused), ≥ 0.001"),
    allow_mixed: bool = typer.Option(False, help="combine vectors of different bases or modes anyway"),
    output_dir: str = _OUT,
    overwrite: bool = _OVERWRITE,
) -> None:
    """Task addition: one α for the sum, chosen on validation (average normalized accuracy), test read once."""
    from taft.arithmetic.runs import addition_run

    _echo(addition_run(vectors, output_dir, alphas=_alphas(alpha_step, 0.0, 1.0), allow_mixed=allow_mixed,
                       overwrite=overwrite))


@arithmetic_app.command("negate")
def arithmetic_negate(
    vector: str = typer.Argument(..., help="the target task's vector"),
    control: str = typer.Option(..., help="control task that must keep its accuracy"),
    threshold: float = typer.Option(0.95, help="control keeps ≥ this fraction (in [0, 1]) of its zero-shot "
                                               "accuracy"),
    alpha_step: float = typer.Option(0.05, help="α grid 0, step, ..., 1 (w0 − α·τ), chosen on validation; the "
                                                "step must divide 1 (0.05, 0.1, 0.25, ...), ≥ 0.001"),
    output_dir: str = _OUT,
    overwrite: bool = _OVERWRITE,
) -> None:
    """Task negation: lower the target task while the control task keeps its accuracy."""
    from taft.arithmetic.runs import negation_run

    _echo(negation_run(vector, control, output_dir, alphas=_alphas(alpha_step, 0.0, 1.0), threshold=threshold,
                       overwrite=overwrite))


@arithmetic_app.command("disentangle")
def arithmetic_disentangle(
    vectors: list[str] = typer.Argument(..., help="two task vectors"),
    alpha_step: float = typer.Option(1.0, help="grid −3, −3 + step, ..., 3 on each axis; the step must divide 6 "
                                               "(0.5, 1, 2, 3, ...), ≥ 0.006"),
    points: int = typer.Option(100, min=1, help="test sentences per task"),
    output_dir: str = _OUT,
    overwrite: bool = _OVERWRITE,
) -> None:
    """Weight disentanglement error ξ(α1, α2) over [−3, 3]² (JSON + PNG heatmaps)."""
    from taft.arithmetic.runs import disentangle_run

    res = disentangle_run(vectors, output_dir, alphas=_alphas(alpha_step, -3.0, 3.0), points=points,
                          overwrite=overwrite)
    _echo({k: res[k] for k in ("mode", "tasks", "alphas", "points")})


@arithmetic_app.command("similarity")
def arithmetic_similarity(
    vectors: list[str] = typer.Argument(..., help="task vectors"),
    allow_mixed: bool = typer.Option(False, help="compare vectors of different bases or modes anyway"),
    output_dir: str = _OUT,
    overwrite: bool = _OVERWRITE,
) -> None:
    """Cosine-similarity matrix of task vectors (JSON + PNG heatmap)."""
    from taft.arithmetic.runs import similarity_run

    _echo(similarity_run(vectors, output_dir, allow_mixed=allow_mixed, overwrite=overwrite))
# -- end taft arithmetic ------------------------------------------------------------------------------------


def _error(message: str) -> int:
    typer.echo(f"taft: error: {message}", err=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point; ``main([...])`` runs a command in-process and returns its exit code.

    User errors (:class:`TaftError`, bad flags, files that cannot be read or written, running out of memory)
    print one ``taft: error: ...`` line and return 2; anything else is a bug and keeps its traceback."""
    cmd = typer.main.get_command(app)
    import os
    import warnings

    args = argv if argv is not None else sys.argv[1:]
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1") and args[:1] != ["train"] and "--help" not in args:
        return _error(f"torchrun runs `taft train` only, not `taft {' '.join(args[:2])}`: run it as one process "
                      f"(shard stores train many shards in parallel with --backend ray)")

    fmt = warnings.formatwarning

    def taft_format(message, category, filename, lineno, line=None):
        if category.__module__.startswith("taft."):  # our own warnings: one plain line, like our errors
            return f"taft: warning: {message}\n"
        return fmt(message, category, filename, lineno, line)

    warnings.formatwarning = taft_format
    try:
        rv = cmd.main(args=args, prog_name="taft", standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("taft: interrupted", err=True)
        return 130
    except click_exc.NoArgsIsHelpError as e:  # `taft` alone: the help text
        e.show()
        return e.exit_code
    except click_exc.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        return _error(f"{e.format_message()}{hint}")
    except click_exc.ClickException as e:
        typer.echo(f"taft: error: {e.format_message()}", err=True)
        return e.exit_code
    except TaftError as e:
        return _error(str(e))
    except OSError as e:  # a file or folder the user named cannot be read or written (disk full, permissions)
        where = f": {e.filename}" if e.filename else ""
        return _error(f"{e.strerror or e}{where}")
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError":  # torch's, without importing torch for `taft --help`
            return _error("out of memory; lower --batch-size / --eval-batch-size or --max-length")
        raise
    finally:
        warnings.formatwarning = fmt
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
