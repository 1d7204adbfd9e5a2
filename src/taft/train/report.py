"""Result tables for the terminal (rich) and for files (markdown)."""

from __future__ import annotations

from rich.table import Table

from taft.cli import console


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def print_results(results) -> None:
    table = Table(title="taft results")
    for col in ("method", "data", "scope", "val acc", "test acc", "trainable", "cache s", "train s", "total s"):
        table.add_column(col, no_wrap=True)
    for r in results:
        c = r.config
        table.add_row(c["method"], c["data"], c["scope"] if c["method"] in ("taft", "nlft") else "—",
                      _pct(r.val_acc), _pct(r.test_acc), f"{r.trainable_params:,}", f"{r.cache_s:.1f}",
                      f"{r.train_s:.1f}", f"{r.total_s:.1f}")
    console().print(table)
    for r in results:
        if r.output_dir:
            console().print(f"wrote {r.output_dir}/ (delta.safetensors, config.yaml, metrics.jsonl, results.json, "
                          f"run.json)")
