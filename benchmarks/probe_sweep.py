"""Linear-probe settings on the five sentence tasks, validation accuracy only (how the probe defaults were chosen).

    python benchmarks/probe_sweep.py        # ~15 min on 2 CPU cores; prints one JSON line per setting

Mean-pooled, L2-normalized MiniLM features (seed-0 splits: SST-2/SST-5 dev files, else a seeded 10 % of train),
a head started from the zero-shot head (20 × label-description embeddings), Adam, cosine schedule, batch 32 —
the same fit as ``--method fc``. Test splits are never read. Writes ``benchmarks/results/probe_sweep.jsonl``.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch

from taft.data.text import SENTENCE_TASKS, load_text_dataset
from taft.train.losses import make_loss
from taft.train.text import encode_texts
from taft.zoo import load_model, load_tokenizer


def features() -> dict:
    tok, model = load_tokenizer("minilm"), load_model("minilm").eval()
    out = {}
    for task in ("mr", "sst2", "sst5", "subj", "trec"):
        s = load_text_dataset(task, None, seed=0)
        d = {n: (encode_texts(model, tok, ds.texts, max_length=128), ds.labels.clone())
             for n, ds in (("train", s.train), ("val", s.val))}
        d["desc"] = encode_texts(model, tok, list(SENTENCE_TASKS[task].descriptions), max_length=128)
        out[task] = d
    return out


def fit(d: dict, lr: float, epochs: int, loss: str, bs: int = 32, seed: int = 0) -> float:
    (X, y), (Xv, yv) = d["train"], d["val"]
    W = (20 * d["desc"]).clone().requires_grad_()
    b = torch.zeros(W.shape[0], requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr)
    g = torch.Generator().manual_seed(seed)
    total = math.ceil(len(X) / bs) * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    lf = make_loss(loss)
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        for s in range(0, len(X), bs):
            i = perm[s:s + bs]
            opt.zero_grad()
            lf(X[i] @ W.T + b, y[i]).backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return float(((Xv @ W.T + b).argmax(-1) == yv).float().mean())


def main() -> None:
    feats = features()
    rows = []
    for lr, epochs, loss in itertools.product([1e-2, 3e-2, 1e-1], [10, 30, 100], ["rsl", "ce"]):
        accs = {t: round(100 * fit(d, lr, epochs, loss), 2) for t, d in feats.items()}
        rows.append({"lr": lr, "epochs": epochs, "loss": loss, "val_avg": round(sum(accs.values()) / len(accs), 2),
                     **accs})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(__file__).parent / "results" / "probe_sweep.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
