"""Speed and memory of the tangent engine, side by side in one run: ours vs torch.func vs the plain model.

    python benchmarks/tangent_speed.py                    # MiniLM on this machine's device
    python benchmarks/tangent_speed.py --models minilm,tiny-vit --batch 64 --seq 64 --device cuda

For each model and scope it times (median of --repeat runs after warm-up):
* forward: plain model (no grad) · our one-pass tangent forward (primal + J·Δw) · torch.func.jvp reference;
* a training step (forward + backward + Adam): ordinary fine-tuning (NLFT) of the same parameters · TAFT with
  the VJP backward (our default) · TAFT differentiating through the tangent pass;
and counts the bytes autograd saves for backward in each training step (activation memory, exact on any
device). Writes ``benchmarks/results/tangent_speed.json`` and ``.md`` with ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from taft.engine.reference import reference_jvp
from taft.tangent_model import TangentModel
from taft.zoo import load_model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def saved_bytes(fn) -> int:
    """Bytes of tensors autograd saves for backward during ``fn`` (storage counted once)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def inputs_for(tm, batch: int, seq: int, device):
    args, kwargs = tm.family.example_inputs(batch, torch.Generator().manual_seed(0))
    if "attention_mask" in kwargs:  # full-length rows: the cost we report is per real token
        V = tm.base.config.vocab_size if hasattr(tm.base, "config") else 1000
        args = (torch.randint(1, V, (batch, seq), generator=torch.Generator().manual_seed(0)),)
        kwargs = {"attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def bench(name: str, scope: str, batch: int, seq: int, repeat: int, device, dtype) -> dict:
    model = load_model(name).to(device, dtype).eval()
    tm = TangentModel(model, scope).to(device)
    with torch.no_grad():
        for d in tm.delta_dict().values():
            d.normal_(0, 1e-3)
    args, kw = inputs_for(tm, batch, seq, device)
    nl = TangentModel(model, scope, linear=False).to(device)
    row = {"model": name, "scope": scope, "batch": batch, "seq": seq, "linearized_tensors": len(tm.linearized)}

    def plain():
        with torch.no_grad():
            model(*args, **kw)

    def ours():
        with torch.no_grad():
            tm.forward_parts(*args, **kw)

    def ref():
        reference_jvp(tm, *args, **kw)

    row["plain_forward_ms"] = 1e3 * timeit(plain, device, repeat)
    row["tangent_forward_ms"] = 1e3 * timeit(ours, device, repeat)
    row["torch_func_jvp_ms"] = 1e3 * timeit(ref, device, repeat)

    def step_fn(m, backward="vjp"):
        opt = torch.optim.Adam(list(m.delta_dict().values()), lr=1e-4)

        def step():
            m.backward = backward
            out = m(*args, **kw)
            loss = out.float().pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    for label, m, mode in (("nlft", nl, "vjp"), ("taft_vjp", tm, "vjp"), ("taft_through_tangent", tm, "tangent")):
        row[f"{label}_step_ms"] = 1e3 * timeit(step_fn(m, mode), device, repeat)
        m.backward = mode
        row[f"{label}_saved_mb"] = saved_bytes(lambda m=m: m(*args, **kw)) / 2**20
    tm.backward = "vjp"
    row["ratio_tangent_vs_plain"] = row["tangent_forward_ms"] / row["plain_forward_ms"]
    row["ratio_torch_func_vs_plain"] = row["torch_func_jvp_ms"] / row["plain_forward_ms"]
    row["ratio_ours_vs_torch_func"] = row["tangent_forward_ms"] / row["torch_func_jvp_ms"]
    row["ratio_taft_step_vs_nlft"] = row["taft_vjp_step_ms"] / row["nlft_step_ms"]
    row["ratio_taft_memory_vs_nlft"] = row["taft_vjp_saved_mb"] / max(row["nlft_saved_mb"], 1e-9)
    return row


def markdown(rows, meta) -> str:
    out = [f"Tangent engine speed, {meta['date']}, {meta['device']}, torch {meta['torch']}, {meta['dtype']}.", "",
           f"Command: `{meta['command']}`", "",
           "| model | scope | B×T | plain fwd ms | tangent fwd ms (×plain) | torch.func jvp ms (×plain) | "
           "ours ÷ torch.func | NLFT step ms | TAFT step ms (×NLFT) | saved for backward MB: NLFT / TAFT-vjp / "
           "through-tangent |", "|---" * 10 + "|"]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['scope']} | {r['batch']}×{r['seq']} | {r['plain_forward_ms']:.1f} | "
            f"{r['tangent_forward_ms']:.1f} ({r['ratio_tangent_vs_plain']:.2f}×) | {r['torch_func_jvp_ms']:.1f} "
            f"({r['ratio_torch_func_vs_plain']:.2f}×) | {r['ratio_ours_vs_torch_func']:.2f} | "
            f"{r['nlft_step_ms']:.1f} | {r['taft_vjp_step_ms']:.1f} ({r['ratio_taft_step_vs_nlft']:.2f}×) | "
            f"{r['nlft_saved_mb']:.1f} / {r['taft_vjp_saved_mb']:.1f} / {r['taft_through_tangent_saved_mb']:.1f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm")
    ap.add_argument("--scopes", default="all,last:1")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for name in args.models.split(","):
        for scope in args.scopes.split(","):
            rows.append(bench(name, scope, args.batch, args.seq, args.repeat, device, dtype))
            print(json.dumps(rows[-1]), flush=True)
    dev = torch.cuda.get_device_name(0) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    meta = {"date": datetime.date.today().isoformat(), "device": dev, "torch": torch.__version__,
            "dtype": args.dtype,
            "command": "python benchmarks/tangent_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "tangent_speed" + ("-cuda" if device.type == "cuda" else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / f"{stem}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
