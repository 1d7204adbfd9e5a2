"""Result tables for the terminal (rich) and for files (markdown)."""

from __future__ import annotations

from rich.table import Table

from taft.console import console


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def print_results(results) -> None:
    table = Table(title="taft results")
    private = any(getattr(r, "privacy", None) for r in results)
    cols = ("method", "data", "scope", "val acc", "test acc", "trainable", "cache s", "train s", "total s")
    for col in (*cols, "ε spent (δ)", "σ") if private else cols:
        table.add_column(col, no_wrap=True)
    for r in results:
        c = r.config
        row = [c["method"], c["data"], c["scope"] if c["method"] in ("taft", "nlft") else "—",
               _pct(r.val_acc), _pct(r.test_acc), f"{r.trainable_params:,}", f"{r.cache_s:.1f}",
               f"{r.train_s:.1f}", f"{r.total_s:.1f}"]
        if private:
            p = r.privacy
            row += [f"{p['epsilon']:.3f} ({p['delta']:g})", f"{p['noise_multiplier']:.3f}"] if p else ["—", "—"]
        table.add_row(*row)
    console().print(table)
    for r in results:
        if r.output_dir:
            console().print(f"wrote {r.output_dir}/ (delta.safetensors, config.yaml, metrics.jsonl, results.json, "
                          f"run.json)")


def print_search(res) -> None:
    """The candidates (validation accuracy), the choice, and its test accuracy per seed."""
    table = Table(title=f"taft search: {res.method} (selected on validation)")
    for col in ("setting", "val acc", "chosen"):
        table.add_column(col, no_wrap=col != "setting")
    for c in res.candidates:
        table.add_row(", ".join(f"{k}={v}" for k, v in c.setting.items()), _pct(c.val_acc),
                      "✓" if c.setting == res.chosen else "")
    console().print(table)
    seeds = ", ".join(f"seed {s}: {_pct(a)}" for s, a in zip(res.seeds, res.test_accs, strict=True))
    console().print(f"test accuracy of the chosen setting: {100 * res.test_mean:.2f} ± {100 * res.test_std:.2f} "
                    f"({seeds})")
    if res.privacy:
        p = res.privacy
        console().print(f"privacy of the search as a whole: ε ≤ {p['epsilon']:.3g}, δ ≤ {p['delta']:.3g} over "
                        f"{p['runs']} runs on the same training data (basic composition; each run alone: its own "
                        f"ε); the validation split is not protected")
