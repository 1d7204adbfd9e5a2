"""Speed and memory of tangent fine-tuning, side by side in one run: TAFT vs torch.func vs the plain model (issue #11).

    python benchmarks/tangent_speed.py                                   # ViT-B/16, ViT-L/16, BERT-base, MiniLM
    python benchmarks/tangent_speed.py --models vit_b16 --dtypes bfloat16 --time-budget 500
    python benchmarks/tangent_speed.py --small                           # tiny models, CPU/CI preset

Models (random Δw ~ N(0, 1e-3), eval mode): ``vit_b16`` / ``vit_l16`` (timm, random init, batch 64 / 32),
``bert_base`` (BERT-base shape, random init, no pooler, batch 64 × 128 tokens, all-ones mask), ``minilm``
(all-MiniLM-L6-v2, 64 × 128; ``minilm_shape``: its shape with random weights, where the package is not
installed); any other :func:`taft.zoo.load_model` name works too (``--small``:
``tiny-vit,tiny-bert``, batch 4, 16 tokens). One row per (model, scope, dtype); each row measures
(median of ``--repeat`` calls after ``--warmup``; CUDA events on CUDA, ``perf_counter`` on CPU):

* ``plain_fwd``: the model's own forward, under ``no_grad``;
* ``taft_fwd``: ``TangentModel.forward_parts`` — f(x; w0) and J·Δw in one pass, under ``no_grad``;
* ``func_jvp_fwd``: ``torch.func.jvp`` of the model's own forward (``reference_jvp``), under ``no_grad``. When it
  fails on a pure-bf16 model, it is rerun on a float32 copy under bf16 autocast (``func_jvp_mode: "autocast"``);
* ``ordinary_step``: ordinary fine-tuning of the scope's parameters (the model's own forward and backward, only
  those parameters trainable) — what one would run instead of TAFT;
* ``taft_step``: TAFT training Δw with the VJP backward (``backward="vjp"``, the default);
* ``func_step``: TAFT by differentiating through ``torch.func.jvp`` (tangents = Δw, requiring grad).

A step is forward + loss ``out.float().pow(2).mean()`` + backward + Adam (lr 1e-4) on the trained tensors.
Memory (``*_mb``): on CUDA (``"memory": "cuda-peak"``) the peak allocated during one call above what was allocated
before it (after warm-up, so Adam state already exists), for all six; on CPU (``"saved-tensors"``) the bytes
autograd saves for backward in each of the three steps (weights a backward needs included). Ratios:
``ratio_A_vs_B`` = A / B. ``rel_err_f0`` / ``rel_err_jvp``: max-relative error of TAFT's f0 and J·Δw (from the
full benchmark batch, first 4 examples) against ``reference_jvp`` of a float64 copy of the same model and Δw.
``fallback_modules``: modules that ran the generic ``torch.func`` fallback instead of a closed-form rule (should be
empty). A torch.func cell that fails records ``func_jvp_fwd_error`` / ``func_step_error`` (``func_jvp_pure_error``
for the pure-bf16 try), a failed correctness check ``check_error``, anything else the row's ``error``.

Writes ``--out``/``tangent_speed-{cuda,cpu}.json`` and ``.md`` (one table per dtype) after every row, and prints
each row as one JSON line, so a run that is killed keeps what it measured; ``--time-budget`` stops starting cells.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from taft.engine.fallback import forward_ad_safe_attention
from taft.engine.reference import max_rel_err, model_function, reference_jvp
from taft.tangent_model import TangentModel
from taft.train.rundir import write_json
from taft.zoo import load_model

# name -> (builder, batch, tokens of text inputs)
MODELS = {
    "vit_b16": (lambda: load_model("timm:vit_base_patch16_224", pretrained=False), 64, 128),
    "vit_l16": (lambda: load_model("timm:vit_large_patch16_224", pretrained=False), 32, 128),
    "bert_base": (lambda: _bert_base(), 64, 128),
    "minilm": (lambda: load_model("minilm"), 64, 128),
    "minilm_shape": (lambda: _bert_base(hidden_size=384, num_hidden_layers=6, intermediate_size=1536), 64, 128),
}
SMALL = {"models": "tiny-vit,tiny-bert", "batch": 4, "seq": 16, "repeat": 2, "warmup": 1}
CHECK_EXAMPLES = 4
LR = 1e-4


def _bert_base(**config):
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(**config), add_pooling_layer=False).eval()


def build(name: str):
    builder, batch, seq = MODELS.get(name, (lambda: load_model(name), 32, 128))
    torch.manual_seed(0)
    return builder().float().eval(), batch, seq


def inputs_for(tm: TangentModel, batch: int, seq: int, device) -> tuple[tuple, dict]:
    args, kw = tm.family.example_inputs(batch, torch.Generator().manual_seed(0))
    if "attention_mask" in kw:  # full-length rows: the cost reported is per real token
        ids = torch.randint(1, tm.base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
        args, kw = (ids,), {"attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    return _map(args, kw, lambda x: x.to(device))


def _map(args, kw, fn, floating_only=False):
    def f(x):
        if not isinstance(x, torch.Tensor) or (floating_only and not x.is_floating_point()):
            return x
        return fn(x)

    return tuple(f(a) for a in args), {k: f(v) for k, v in kw.items()}


def tokens(model, args, kw) -> int | None:
    if "attention_mask" in kw:
        return kw["attention_mask"].shape[1]
    pe = getattr(model, "patch_embed", None)  # timm ViT
    return pe.num_patches + getattr(model, "num_prefix_tokens", 1) if pe is not None else None


# -- measuring ----------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, repeat: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        events = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def peak_mb(fn) -> float:
    """CUDA memory allocated at the peak of one call of ``fn``, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


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


def measure(row: dict, label: str, fn, device, opts, step: bool) -> None:
    row[f"{label}_ms"] = median_ms(fn, device, opts.repeat, opts.warmup)
    if device.type == "cuda":
        row[f"{label}_mb"] = peak_mb(fn)
    elif step:
        row[f"{label}_mb"] = saved_bytes(fn) / 2**20


def try_measure(row: dict, label: str, make, device, opts, step: bool = False) -> bool:
    """``measure(make())``; on failure, record ``{label}_error`` instead. Whatever ``make`` built (model copies) and
    the failed call's frames are released on return, before the caller frees the CUDA cache."""
    try:
        measure(row, label, make(), device, opts, step)
        return True
    except Exception as e:
        for k in (f"{label}_ms", f"{label}_mb"):
            row.pop(k, None)
        row[f"{label}_error"] = _err(e)
        return False


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def _free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def adam_step(params, loss_fn):
    opt = torch.optim.Adam(params, lr=LR)

    def step():
        loss = loss_fn().float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def tangent_model_like(tm: TangentModel, model, scope: str) -> TangentModel:
    """A TangentModel of ``model`` (a converted copy of ``tm.base``) with ``tm``'s Δw."""
    other = TangentModel(model, scope)
    dtype = next(model.parameters()).dtype
    other.load_delta({n: d.detach().to(dtype) for n, d in tm.delta_dict().items()})
    return other


def ordinary_step(model, tm: TangentModel, args, kw):
    """Ordinary fine-tuning: a copy of ``model`` with exactly the scope's parameters trainable."""
    model = copy.deepcopy(model)
    trained = set(tm.linearized)
    for n, p in model.named_parameters():
        p.requires_grad_(n in trained)
    return adam_step([p for p in model.parameters() if p.requires_grad],
                     lambda: tm.family.select_output(model(*args, **kw)))


# -- one row ------------------------------------------------------------------------------------------------
def bench(model, name: str, scope: str, batch: int, seq: int, device, dtype, opts) -> dict:
    tm = TangentModel(model, scope)
    args, kw = inputs_for(tm, batch, seq, device)
    row = {"model": name, "scope": scope, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
           "tokens": tokens(model, args, kw), "memory": "cuda-peak" if device.type == "cuda" else "saved-tensors"}
    torch.manual_seed(0)
    with torch.no_grad():
        for d in tm.delta_dict().values():
            d.normal_(0, 1e-3)
    row["linearized_tensors"] = len(tm.linearized)

    # forward
    def plain():
        with torch.no_grad():
            model(*args, **kw)

    def taft_fwd():
        with torch.no_grad():
            tm.forward_parts(*args, **kw)

    measure(row, "plain_fwd", plain, device, opts, step=False)
    measure(row, "taft_fwd", taft_fwd, device, opts, step=False)
    with torch.no_grad():
        f0, t = tm.forward_parts(*args, **kw)
    row["fallback_modules"] = list(tm.fallback_modules)
    f0, t = f0[:CHECK_EXAMPLES].double(), t[:CHECK_EXAMPLES].double()

    def func_fwd(m, a, k, autocast=False):
        def call():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                reference_jvp(m, *a, **k)

        return call

    row["func_jvp_mode"] = "pure"
    if not try_measure(row, "func_jvp_fwd", lambda: func_fwd(tm, args, kw), device, opts) \
            and dtype == torch.bfloat16:  # failed on pure bf16: retry as bf16 is usually run, float32 under autocast
        row["func_jvp_mode"], row["func_jvp_pure_error"] = "autocast", row.pop("func_jvp_fwd_error")
        a32, k32 = _map(args, kw, lambda x: x.float(), floating_only=True)
        try_measure(row, "func_jvp_fwd", lambda: func_fwd(
            tangent_model_like(tm, copy.deepcopy(model).float(), scope), a32, k32, autocast=True), device, opts)
        _free(device)

    # correctness against a float64 copy, on the first examples
    try:
        tm64 = tangent_model_like(tm, copy.deepcopy(model).double(), scope)
        a64, k64 = _map(args, kw, lambda x: x[:CHECK_EXAMPLES])
        a64, k64 = _map(a64, k64, lambda x: x.double(), floating_only=True)
        with torch.no_grad():
            rf0, rt = reference_jvp(tm64, *a64, **k64)
        row["rel_err_f0"], row["rel_err_jvp"] = max_rel_err(f0, rf0), max_rel_err(t, rt)
    except Exception as e:
        row["check_error"] = _err(e)
    tm64 = rf0 = rt = f0 = t = None
    _free(device)

    # training steps
    measure(row, "ordinary_step", ordinary_step(model, tm, args, kw), device, opts, step=True)
    _free(device)

    tm.backward = "vjp"
    deltas = tm.delta_dict()
    measure(row, "taft_step", adam_step(list(deltas.values()), lambda: tm(*args, **kw)), device, opts, step=True)

    f, lin = model_function(tm, args, kw)

    def through_jvp():
        with forward_ad_safe_attention():
            y0, ty = torch.func.jvp(f, (lin,), (deltas,))
        return y0 + ty

    try_measure(row, "func_step", lambda: adam_step(list(deltas.values()), through_jvp), device, opts, step=True)
    return row


def add_ratios(row: dict) -> None:
    def ratio(a, b):
        return row[a] / row[b] if row.get(a) is not None and row.get(b) else None

    row["ratio_taft_fwd_vs_plain"] = ratio("taft_fwd_ms", "plain_fwd_ms")
    row["ratio_func_jvp_fwd_vs_plain"] = ratio("func_jvp_fwd_ms", "plain_fwd_ms")
    row["ratio_taft_fwd_vs_func_jvp"] = ratio("taft_fwd_ms", "func_jvp_fwd_ms")
    row["ratio_taft_step_vs_ordinary"] = ratio("taft_step_ms", "ordinary_step_ms")
    row["ratio_func_step_vs_ordinary"] = ratio("func_step_ms", "ordinary_step_ms")
    row["ratio_taft_step_mem_vs_ordinary"] = ratio("taft_step_mb", "ordinary_step_mb")


# -- output -------------------------------------------------------------------------------------------------
def _f(x, fmt=".1f"):
    return "—" if x is None else format(x, fmt)


def _mb(x):
    return "—" if x is None else f"{x:.1f}" if x >= 10 else f"{x:.3f}"


def _with_ratio(row, key, ratio, fail_key=None):
    if row.get(key) is None:
        err = row.get(fail_key or "")
        return f"failed ({err.split(':')[0]})" if err else "—"
    r = row.get(ratio)
    return f"{row[key]:.1f} ({_f(r, '.2f')}×)"


def markdown(rows: list[dict], meta: dict) -> str:
    mem = "peak MB" if meta["memory"] == "cuda-peak" else "saved-for-backward MB"
    out = [f"Tangent fine-tuning speed and memory — {meta['device']}, {meta['date']}, torch {meta['torch']}.", "",
           f"Command: `{meta['command']}`", "",
           *([f"**Stopped early:** {meta['stopped']}.", ""] if meta.get("stopped") else []),
           "Times are medians in ms; (×) is the ratio to the plain forward or the ordinary step. Memory: "
           + ("CUDA peak allocated during one call, above what was allocated before it."
              if meta["memory"] == "cuda-peak" else "bytes autograd saves for backward in one training step."),
           ""]
    for dtype in meta["dtypes"]:
        out += [f"### {dtype}", "",
                "| model | scope | B×T | plain fwd ms | taft fwd ms (× plain) | torch.func jvp ms (× plain) | "
                f"ordinary step ms | TAFT step ms (× ordinary) | torch.func step ms (× ordinary) | "
                f"{mem} ordinary / TAFT (× ordinary) | rel err f0 / jvp |", "|---" * 11 + "|"]
        for r in (r for r in rows if r["dtype"] == dtype):
            bt = f"{r['batch']}×{r['tokens']}" if r.get("tokens") else str(r["batch"])
            if "error" in r:
                out.append(f"| {r['model']} | {r['scope']} | {bt} | error: {r['error'].replace('|', '/')} |" + " |" * 7)
                continue
            jvp = _with_ratio(r, "func_jvp_fwd_ms", "ratio_func_jvp_fwd_vs_plain", "func_jvp_fwd_error")
            if r.get("func_jvp_mode") == "autocast":
                jvp += " autocast"
            out.append(
                f"| {r['model']} | {r['scope']} | {bt} | {_f(r.get('plain_fwd_ms'))} | "
                f"{_with_ratio(r, 'taft_fwd_ms', 'ratio_taft_fwd_vs_plain')} | {jvp} | "
                f"{_f(r.get('ordinary_step_ms'))} | {_with_ratio(r, 'taft_step_ms', 'ratio_taft_step_vs_ordinary')} | "
                f"{_with_ratio(r, 'func_step_ms', 'ratio_func_step_vs_ordinary', 'func_step_error')} | "
                f"{_mb(r.get('ordinary_step_mb'))} / {_mb(r.get('taft_step_mb'))} "
                f"({_f(r.get('ratio_taft_step_mem_vs_ordinary'), '.2f')}×) | "
                f"{_f(r.get('rel_err_f0'), '.1e')} / {_f(r.get('rel_err_jvp'), '.1e')} |")
        out.append("")
    return "\n".join(out)


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def write(out: Path, stem: str, rows: list[dict], meta: dict) -> None:
    write_json(out / f"{stem}.json", {"meta": meta, "rows": rows})
    md, tmp = out / f"{stem}.md", out / f".{stem}.md.tmp-{os.getpid()}"
    tmp.write_text(markdown(rows, meta))
    os.replace(tmp, md)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma list (default vit_b16,vit_l16,bert_base,minilm)")
    ap.add_argument("--scopes", default="all,last:1")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch", type=int, help="overrides every model's default batch")
    ap.add_argument("--seq", type=int, help="overrides every text model's default length")
    ap.add_argument("--repeat", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--small", action="store_true", help="tiny-vit,tiny-bert, batch 4, seq 16, repeat 2, warmup 1")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--time-budget", type=float, help="seconds; no new cell starts after that")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    opts = ap.parse_args(argv)
    defaults = SMALL if opts.small else {"models": ",".join(MODELS), "repeat": 10, "warmup": 3}
    for k, v in defaults.items():
        if getattr(opts, k) is None:
            setattr(opts, k, v)

    t_start = time.monotonic()
    device = torch.device(opts.device)
    dtypes = opts.dtypes.split(",")
    cuda = device.type == "cuda"
    argv_ = sys.argv[1:] if argv is None else list(argv)
    meta = {
        "device": torch.cuda.get_device_name(device) if cuda
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "triton": _version("triton"), "timm": _version("timm"),
        "transformers": _version("transformers"), "dtypes": dtypes, "memory": "cuda-peak" if cuda else "saved-tensors",
        "repeat": opts.repeat, "warmup": opts.warmup,
        "command": shlex.join(["python", "benchmarks/tangent_speed.py", *argv_]),
    }
    if "TRITON_INTERPRET" in os.environ:
        meta["triton_interpret"] = os.environ["TRITON_INTERPRET"]
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"tangent_speed-{'cuda' if cuda else 'cpu'}"
    rows: list[dict] = []

    def over_budget() -> bool:
        if opts.time_budget is not None and time.monotonic() - t_start > opts.time_budget:
            meta["stopped"] = f"time budget of {opts.time_budget:g} s spent; later cells not run"
            return True
        return False

    for name in opts.models.split(","):
        if over_budget():
            break
        try:
            master, batch, seq = build(name)
        except Exception as e:
            for dtype_name in dtypes:
                rows.append({"model": name, "scope": opts.scopes, "dtype": dtype_name, "batch": opts.batch,
                             "error": _err(e)})
                print(json.dumps(rows[-1]), flush=True)
            write(out, stem, rows, meta)
            continue
        batch, seq = opts.batch or batch, opts.seq or seq
        for dtype_name in dtypes:
            for scope in opts.scopes.split(","):
                if over_budget():
                    break
                row = {"model": name, "scope": scope, "dtype": dtype_name, "batch": batch}
                model = None
                try:
                    model = copy.deepcopy(master).to(device, getattr(torch, dtype_name))
                    row = bench(model, name, scope, batch, seq, device, getattr(torch, dtype_name), opts)
                    add_ratios(row)
                except Exception as e:
                    row["error"] = _err(e)
                del model
                with contextlib.suppress(Exception):
                    _free(device)
                row["elapsed_s"] = round(time.monotonic() - t_start, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
                write(out, stem, rows, meta)
        del master
    write(out, stem, rows, meta)
    print(markdown(rows, meta), flush=True)
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
