"""SST-2 ablation of TAFT-1 choices (one run per spec; MiniLM, real weights, single seed).

    python benchmarks/ablation.py                      # the specs below, in order
    python benchmarks/ablation.py '{"lr": 3e-3}' ...   # your own specs (TrainConfig fields as JSON)

Every spec is applied on top of BASE (zero-shot head, 5 epochs, Adam 1e-3 cosine, RSL κ=1 M=15, λ=1e-4),
so the rows differ from the reference setting in exactly what the spec says. Prefix features are cached on
disk (``/tmp/taft-cache``) and reused across runs. Writes ``benchmarks/results/ablation.json`` and ``.md``.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

from taft.config import TrainConfig
from taft.train.loop import train

BASE = dict(data="sst2", head_init="zero-shot", epochs=5, lr=1e-3, cache="disk", cache_dir="/tmp/taft-cache",
            threads=2)
SPECS = [
    {}, {"method": "nlft"}, {"method": "fc", "lr": 1e-2, "epochs": 10},
    {"lr": 3e-3}, {"lr": 1e-2}, {"epochs": 10}, {"penalty": 0.0, "lr": 3e-3}, {"head_init": "random", "lr": 3e-3},
    {"reinit": True}, {"rsl_m": 5.0}, {"kappa": 3.0}, {"loss": "ce", "lr": 3e-3}, {"loss": "mse"},
    {"head_init": "probe"}, {"head_init": "probe", "method": "nlft"},
]


def main(argv: list[str]) -> None:
    specs = [json.loads(a) for a in argv] or SPECS
    rows = []
    for spec in specs:
        r = train(TrainConfig(**{**BASE, **spec}), progress=False)
        rows.append({"spec": spec, "val_acc": r.val_acc, "test_acc": r.test_acc, "train_s": round(r.train_s),
                     "curve": [(round(e["train_loss"], 2), round(e["val_acc"], 4)) for e in r.epochs]})
        print(json.dumps(rows[-1]), flush=True)
        _write(rows, len(specs))  # after every run: an interrupted ablation keeps what it finished


def _write(rows: list[dict], planned: int) -> None:
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "ablation.json").write_text(json.dumps({"date": datetime.date.today().isoformat(), "base": BASE,
                                                   "command": "python benchmarks/ablation.py",
                                                   "planned_runs": planned, "runs": rows}, indent=2))
    lines = [f"SST-2, MiniLM last block; each row changes the base setting (TAFT-1, zero-shot head, {BASE['epochs']} "
             f"epochs, Adam {BASE['lr']:g} cosine, RSL κ=1 M=15, λ=1e-4) as its spec says; one seed; "
             f"{datetime.date.today().isoformat()}; `python benchmarks/ablation.py`"
             + (f" ({len(rows)} of {planned} runs done)" if len(rows) < planned else "") + ".", "",
             "| change from the base (TAFT-1, zero-shot head) | val acc | test acc | final train loss | train s |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {json.dumps(r['spec'], ensure_ascii=False) if r['spec'] else 'base'} | "
                     f"{100 * r['val_acc']:.2f} | {100 * r['test_acc']:.2f} | "
                     f"{r['curve'][-1][0] if r['curve'] else '—'} | {r['train_s']} |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
