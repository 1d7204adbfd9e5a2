"""Bad command lines, config files, data files and run folders: each is one ``taft: error:`` line and exit 2.

Every case calls ``taft.cli.main([...])`` in-process with files under ``tmp_path``; none may print a traceback
or be silently accepted. Training cases use tiny-bert on a 40-line file, so a case that wrongly got through
would still be quick."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from taft.checkpoint import content_hashes, read_delta
from taft.cli import main
from taft.config import TrainConfig
from taft.train.loop import train
from taft.train.rundir import sha256_file

LINES = [f"{i % 2} sentence number {i} is {'good' if i % 2 else 'bad'}" for i in range(40)]


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


class Case:
    """Files under ``tmp`` and the base ``taft train`` command line on them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data = _write(tmp / "d.txt", "\n".join(LINES) + "\n")
        self.test = _write(tmp / "t.txt", "\n".join(LINES[:10]) + "\n")

    def train(self, *extra: str, data: Path | str | None = None, test: Path | None | bool = True) -> list[str]:
        """``test=False``: no --test-file."""
        test = self.test if test is True else test
        return ["train", "--model", "tiny-bert", "--data", str(data or self.data),
                *(["--test-file", str(test)] if test else []), "--head-init", "random", "--epochs", "1",
                "--max-train", "16", "--max-eval", "8", "--batch-size", "8", *extra]

    def config(self, text: str | bytes, name: str = "c.yaml") -> list[str]:
        return ["train", "--config", str(_write(self.tmp / name, text))]


def assert_one_clean_error(code: int, captured, needle: str) -> None:
    err = captured.err
    assert code == 2, f"exit {code}; stderr: {err[-2000:]}"
    assert "Traceback" not in err + captured.out
    errors = [line for line in err.splitlines() if line.startswith("taft: error:")]
    assert len(errors) == 1, err[-2000:]
    assert needle.lower() in errors[0].lower(), errors[0]


def _images(root: Path) -> Path:
    from PIL import Image

    for split, n in (("train", 3), ("test", 1)):
        for k, name in enumerate(("cat", "dog")):
            (root / "img" / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (16, 16), (100 * k, 20 * i, 0)).save(root / "img" / split / name / f"{i}.png")
    return root / "img"


def _csv(rows: list[tuple[str, str]]) -> str:
    return "text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows)


# (id, argv built from a Case, text the error line must contain)
CASES: list[tuple[str, Callable[[Case], list[str]], str]] = [
    # config files: types, syntax, encoding, shape
    ("yaml-float-field-1.5-for-int", lambda c: c.config("epochs: 1.5\n"), "epochs must be an integer"),
    ("yaml-bool-for-int", lambda c: c.config("batch_size: true\n"), "batch_size must be an integer"),
    ("yaml-word-for-float", lambda c: c.config("lr: fast\n"), "lr must be a number"),
    ("yaml-nan-lr", lambda c: c.config("lr: .nan\n"), "lr must be a finite number"),
    ("yaml-number-for-str", lambda c: c.config("schedule: 3\n"), "schedule must be a string"),
    ("yaml-str-for-int", lambda c: c.config("num_classes: two\n"), "num_classes must be an integer"),
    ("yaml-word-for-bool", lambda c: c.config("reinit: maybe\n"), "reinit must be true or false"),
    ("yaml-null-for-required", lambda c: c.config("batch_size: null\n"), "batch_size needs a value"),
    ("yaml-syntax", lambda c: c.config("lr: [1, 2\n"), "invalid YAML"),
    ("json-syntax", lambda c: c.config('{"lr": 1e-3,}', "c.json"), "invalid JSON"),
    ("config-not-utf8", lambda c: c.config(b"lr: 0.001\nmodel: \xff\xfe\n"), "not UTF-8"),
    ("config-empty", lambda c: c.config(""), "is empty"),
    ("config-list", lambda c: c.config("- lr\n- epochs\n"), "expected a mapping"),
    ("config-unknown-key", lambda c: c.config("epochz: 3\n"), "unknown option"),
    ("config-missing", lambda c: ["train", "--config", str(c.tmp / "nope.yaml")], "does not exist"),
    ("config-is-folder", lambda c: ["train", "--config", str(c.tmp)], "is a folder"),
    # option values
    ("scope-last-abc", lambda c: c.train("--scope", "last:abc"), "last:abc"),
    ("scope-bad-regex", lambda c: c.train("--scope", "re:(unclosed"), "regular expression"),
    ("device-unknown", lambda c: c.train("--device", "gpu"), "device='gpu'"),
    ("threads-negative", lambda c: c.train("--threads", "-3"), "threads must be ≥ 1"),
    ("max-train-negative", lambda c: c.train("--max-train", "-5"), "max_train must be ≥ 1"),
    ("max-train-zero", lambda c: c.train("--max-train", "0"), "max_train must be ≥ 1"),
    ("max-eval-zero", lambda c: c.train("--max-eval", "0"), "max_eval must be ≥ 1"),
    ("lr-negative", lambda c: c.train("--lr", "-1"), "lr must be > 0"),
    ("lr-nan", lambda c: c.train("--lr", "nan"), "lr must be a finite number"),
    ("probe-lr-zero", lambda c: c.train("--probe-lr", "0"), "probe_lr must be > 0"),
    ("penalty-negative", lambda c: c.train("--penalty", "-1"), "penalty must be ≥ 0"),
    ("warmup-one", lambda c: c.train("--warmup", "1"), "warmup"),
    ("radius-zero", lambda c: c.train("--radius", "0"), "radius must be > 0"),
    ("schedule-bogus", lambda c: c.train("--schedule", "bogus"), "schedule='bogus' is not valid"),
    ("method-bogus", lambda c: c.train("--method", "bogus"), "method='bogus' is not valid"),
    ("optimizer-bogus", lambda c: c.train("--optimizer", "bogus"), "optimizer='bogus' is not valid"),
    ("batch-size-zero", lambda c: c.train("--batch-size", "0"), "batch_size must be ≥ 1"),
    ("eval-batch-size-negative", lambda c: c.train("--eval-batch-size", "-1"), "eval_batch_size must be ≥ 1"),
    ("max-length-zero", lambda c: c.train("--max-length", "0"), "max_length must be ≥ 1"),
    ("kappa-zero", lambda c: c.train("--kappa", "0"), "kappa must be > 0"),
    ("rsl-m-negative", lambda c: c.train("--rsl-m", "-2"), "rsl_m must be > 0"),
    ("probe-epochs-zero", lambda c: c.train("--probe-epochs", "0"), "probe_epochs must be ≥ 1"),
    ("lora-r-zero", lambda c: c.train("--method", "lora", "--lora-r", "0"), "lora_r must be ≥ 1"),
    ("lora-alpha-zero", lambda c: c.train("--method", "lora", "--lora-alpha", "0"), "lora_alpha must be > 0"),
    ("step-gamma-zero", lambda c: c.train("--step-gamma", "0"), "step_gamma must be > 0"),
    ("num-classes-one", lambda c: c.train("--num-classes", "1"), "num_classes must be ≥ 2"),
    ("seed-negative", lambda c: c.train("--seed", "-1"), "seed must be"),
    ("cache-dir-is-a-file", lambda c: c.train("--cache", "disk", "--cache-dir", str(c.data)), "is a file"),
    ("cache-disk-without-dir", lambda c: c.train("--cache", "disk"), "cache=disk needs cache_dir"),
    ("lora-scope-all", lambda c: c.train("--method", "lora", "--scope", "all"), "use scope last:K"),
    ("adapter-scope-attn", lambda c: c.train("--method", "adapter", "--scope", "attn"), "use scope last:K"),
    ("empty-output-dir", lambda c: c.train("--output-dir", ""), "output_dir is an empty path"),
    ("flag-not-an-int", lambda c: c.train("--epochs", "abc"), "--epochs"),
    ("unknown-flag", lambda c: c.train("--epochz", "3"), "no such option"),
    ("unknown-model", lambda c: c.train("--model", "no-such-model"), "no-such-model"),
    ("text-model-on-images", lambda c: ["train", "--model", "tiny-bert", "--data", f"imagefolder:{_images(c.tmp)}",
                                        "--head-init", "random"], "cannot take images"),
    # output folders
    ("output-dir-is-a-file", lambda c: c.train("--output-dir", str(c.data)), "is a file"),
    ("output-dir-under-a-file", lambda c: c.train("--output-dir", str(c.data / "run")), "is a file"),
    ("output-dir-with-other-files",
     lambda c: c.train("--output-dir", str(_write(c.tmp / "o" / "notes.txt", "").parent)), "is not empty"),
    ("overwrite-a-folder-of-folders", lambda c: c.train("--output-dir", str(_write(c.tmp / "proj" / "src" / "a.py",
                                                                             "").parent.parent), "--overwrite"),
     "sub-folders"),
    ("overwrite-current-folder", lambda c: c.train("--output-dir", ".", "--overwrite"), "current folder"),
    # data files
    ("data-missing", lambda c: c.train(data=c.tmp / "nope.txt"), "nope.txt"),
    ("data-empty", lambda c: c.train(data=_write(c.tmp / "e.txt", "")), "no examples"),
    ("data-folder-without-train", lambda c: c.train(data=_write(c.tmp / "f" / "x.test.txt", "0 a\n").parent,
                                                    test=False), "train"),
    ("data-one-class", lambda c: c.train(data=_write(c.tmp / "one.txt", "0 a\n0 b\n0 c\n0 d\n"),
                                         test=_write(c.tmp / "one_t.txt", "0 e\n")), "at least 2"),
    ("test-label-not-in-train", lambda c: c.train(test=_write(c.tmp / "t2.txt", "0 a\n3 b\n")), "never occur"),
    ("num-classes-not-in-data", lambda c: c.train("--num-classes", "3"), "no training examples"),
    ("label-gap-one-based", lambda c: c.train(data=_write(c.tmp / "g.txt", "1 a\n2 b\n1 c\n2 d\n1 e\n"),
                                              test=_write(c.tmp / "g_t.txt", "1 x\n")), "no training examples"),
    ("csv-label-typo-once", lambda c: c.train(
        data=_write(c.tmp / "typo.csv", _csv([(f"row {i}", "pos" if i % 2 else "neg") for i in range(120)]
                                            + [("one more", "postive")])),
        test=_write(c.tmp / "typo_t.csv", _csv([("a", "pos"), ("b", "neg")]))), "postive"),
    ("csv-test-label-typo", lambda c: c.train(
        data=_write(c.tmp / "s.csv", _csv([(f"row {i}", "pos" if i % 2 else "neg") for i in range(20)])),
        test=_write(c.tmp / "s_t.csv", _csv([("a", "pos"), ("b", "negative")]))), "negative"),
    ("csv-not-utf8", lambda c: c.train(data=_write(c.tmp / "l.csv", "text,label\ncaf\xe9,0\nok,1\n".encode("latin-1")),
                                       test=c.test), "not valid UTF-8"),
    ("csv-missing-column", lambda c: c.train(data=_write(c.tmp / "m.csv", "sentence,label\na,0\nb,1\n"),
                                             test=False), "missing column"),
    ("registered-task-bad-root", lambda c: ["train", "--model", "tiny-bert", "--data", "sst2", "--data-root",
                                            str(c.tmp / "nowhere")], "not found"),
    ("test-file-with-task", lambda c: ["train", "--model", "tiny-bert", "--data", "sst2", "--test-file",
                                       str(c.test)], "single-file"),
    # taft check
    ("check-dtype-int8", lambda c: ["check", "tiny-bert", "--dtype", "int8"], "float32"),
    ("check-scope-last-abc", lambda c: ["check", "tiny-bert", "--scope", "last:abc"], "last:abc"),
    ("check-unknown-model", lambda c: ["check", "no-such-model"], "unknown model"),
    ("check-batch-zero", lambda c: ["check", "tiny-bert", "--batch", "0"], "--batch"),
    # taft eval without a run
    ("eval-missing-folder", lambda c: ["eval", str(c.tmp / "nope")], "no run folder"),
    ("eval-not-a-run", lambda c: ["eval", str(c.tmp)], "not a taft run folder"),
    ("eval-a-file", lambda c: ["eval", str(c.data)], "is a file"),
    ("eval-bad-split", lambda c: ["eval", str(c.tmp), "--split", "train"], "use val or test"),
    ("eval-legacy-folder", lambda c: ["eval", str(_write(c.tmp / "old" / "config.yaml", "model: tiny-bert\n").parent)],
     "no run.json"),
]


@pytest.mark.parametrize("build,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clean_error(tmp_path, capsys, monkeypatch, build, needle):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # a case that wrongly got through may only touch tmp_path
    argv = build(Case(tmp_path))
    capsys.readouterr()
    assert_one_clean_error(main(argv), capsys.readouterr(), needle)


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("taft.train.loop.prepare", lambda *a, **k: pytest.fail("data loaded before the device check"))
    assert_one_clean_error(main(Case(tmp_path).train("--device", "cuda")), capsys.readouterr(), "no CUDA GPU")


def test_yaml_numeric_strings_and_integral_floats_are_accepted(tmp_path):
    from taft.config import load_config

    _write(tmp_path / "c.yaml", "lr: 1e-3\nprobe_lr: '5e-2'\nepochs: 2.0\nbatch_size: '16'\nreinit: 'false'\n")
    cfg = load_config(TrainConfig, tmp_path / "c.yaml")
    assert (cfg.lr, cfg.probe_lr, cfg.epochs, cfg.batch_size, cfg.reinit) == (1e-3, 5e-2, 2, 16, False)
    assert isinstance(cfg.epochs, int) and isinstance(cfg.lr, float)


def test_csv_with_a_byte_order_mark_just_works(tmp_path, capsys):
    rows = _csv([(f"row {i}", i % 2) for i in range(30)])
    data = _write(tmp_path / "bom.csv", b"\xef\xbb\xbf" + rows.encode())
    c = Case(tmp_path)
    assert main(c.train(data=data, test=_write(tmp_path / "bom_t.csv", b"\xef\xbb\xbf" + rows.encode()))) == 0


def test_sentences_longer_than_the_model_positions_are_cut(tmp_path):
    """tiny-bert has 64 positions, the default max_length is 128: inputs are cut at 64 instead of crashing."""
    long = _write(tmp_path / "long.txt", "".join(f"{i % 2} {' '.join(['word'] * 100)} {i}\n" for i in range(20)))
    res = train(TrainConfig(model="tiny-bert", data=str(long), head_init="random", epochs=1), progress=False)
    assert 0.0 <= res.val_acc <= 1.0


# -- taft eval on a trained run -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("trained")
    c = Case(tmp)
    cfg = TrainConfig(model="tiny-bert", data=str(c.data), test_file=str(c.test), head_init="random", epochs=1,
                      max_train=16, max_eval=8, batch_size=8, output_dir=str(tmp / "run"))
    train(cfg, progress=False)
    return tmp / "run"


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def reseal(run: Path, name: str = "delta.safetensors") -> None:
    """Record ``name``'s current SHA-256 in run.json, as someone forging the manifest would."""
    manifest = json.loads((run / "run.json").read_text())
    manifest["files"][name]["sha256"] = sha256_file(run / name)
    (run / "run.json").write_text(json.dumps(manifest))


def _rewrite_delta(run: Path, change) -> None:
    tensors, meta = read_delta(run / "delta.safetensors")
    tensors = change(tensors)
    meta["content_sha256"] = json.dumps(content_hashes(tensors))
    save_file(tensors, str(run / "delta.safetensors"), metadata=meta)
    reseal(run)


def test_eval_nan_delta_is_a_clear_error(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    _rewrite_delta(run, lambda t: {n: torch.full_like(v, float("nan")) for n, v in t.items()})
    assert_one_clean_error(main(["eval", str(run)]), capsys.readouterr(), "NaN or inf")


def test_eval_wrong_dtype_delta_is_a_clear_error(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    _rewrite_delta(run, lambda t: {n: v.double() for n, v in t.items()})
    assert_one_clean_error(main(["eval", str(run)]), capsys.readouterr(), "dtype torch.float64")


def test_eval_on_data_with_another_class_count(trained, tmp_path, capsys):
    three = _write(tmp_path / "three.txt", "".join(f"{i % 3} s {i}\n" for i in range(30)))
    assert_one_clean_error(main(["eval", str(trained), "--data", str(three), "--split", "val"]),
                           capsys.readouterr(), "has 3 classes, but the run was trained on 2")
