"""``--class-names``: class names for a user's own data, the zero-shot head built from them, their checks, the
CLI, a run and a shard store evaluated later from the stored names, and the override of image class folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from taft.cli import main
from taft.config import ConfigError, TrainConfig, load_config
from taft.shards import evaluate_store, train_store
from taft.train.loop import prepare
from taft.train.text import ZERO_SHOT_SCALE, encode_texts
from taft.train.zero_shot import clip_logit_scale, clip_text_head
from taft.zoo import load_clip_pair, load_model, load_tokenizer

LINES = [f"{i % 3} sentence number {i} is {['bad', 'fine', 'good'][i % 3]} indeed" for i in range(45)]
NAMES = ["a bad review", "a so-so review", "a good review"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("data")
    (d / "d.txt").write_text("\n".join(LINES) + "\n")
    (d / "t.txt").write_text("\n".join(LINES[:12]) + "\n")
    return d / "d.txt", d / "t.txt"


def _cfg(data, **kw) -> TrainConfig:
    d, t = data
    base = dict(model="tiny-bert", data=str(d), test_file=str(t), head_init="zero-shot", epochs=1, batch_size=8,
                max_train=24, threads=1)
    return TrainConfig(**{**base, **kw})


def _head(cfg: TrainConfig) -> torch.Tensor:
    return prepare(cfg, torch.device("cpu")).clf.head.weight.detach()


def _expected(names: list[str]) -> torch.Tensor:
    return ZERO_SHOT_SCALE * encode_texts(load_model("tiny-bert"), load_tokenizer("tiny-bert"), names)


def _clean_error(code: int, captured, needle: str) -> str:
    assert code == 2, captured.err[-2000:]
    assert "Traceback" not in captured.err + captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("taft: error:")]
    assert len(errors) == 1 and needle in errors[0], captured.err[-2000:]
    return errors[0]


# -- the head -------------------------------------------------------------------------------------------------
def test_integer_labels_with_class_names_give_their_zero_shot_head(data, tmp_path):
    with pytest.raises(ConfigError, match="--class-names"):  # integer labels alone have no descriptions
        _head(_cfg(data))
    head = _head(_cfg(data, class_names=", ".join(NAMES)))
    assert torch.allclose(head, _expected(NAMES), atol=1e-6)
    other = _head(_cfg(data, class_names="bad,fine,good"))
    assert torch.allclose(other, _expected(["bad", "fine", "good"]), atol=1e-6)
    assert (head - other).abs().max() > 1e-2  # the names are what the head is built from
    # the file form: one name per line, blank lines and surrounding spaces ignored; the config keeps the names
    path = tmp_path / "names.txt"
    path.write_text(f"\n  {NAMES[0]}\n{NAMES[1]}  \n\n{NAMES[2]}\n")
    cfg = _cfg(data, class_names=f"@{path}")
    assert cfg.class_names == ",".join(NAMES)
    assert torch.equal(_head(cfg), head)


def test_class_names_win_over_a_registered_task_and_string_labels(tmp_path):
    names = ["a negative sentence", "a positive sentence"]
    rows = [f'{{"text": "sentence {i}", "label": "{["neg", "pos"][i % 2]}"}}' for i in range(20)]
    (tmp_path / "s.jsonl").write_text("\n".join(rows) + "\n")
    cfg = dict(model="tiny-bert", data=str(tmp_path / "s.jsonl"), head_init="zero-shot", threads=1)
    assert torch.allclose(_head(TrainConfig(**cfg)), _expected(["neg", "pos"]), atol=1e-6)  # the file's labels
    assert torch.allclose(_head(TrainConfig(**cfg, class_names=",".join(names))), _expected(names), atol=1e-6)
    for split in ("train", "test"):  # a registered task (mr), read from a folder of its files
        (tmp_path / f"mr.{split}.txt").write_text("".join(f"{i % 2} sentence {i}\n" for i in range(20)))
    cfg = dict(cfg, data="mr", data_root=str(tmp_path))
    assert torch.allclose(_head(TrainConfig(**cfg)), _expected(["a negative movie review", "a positive movie review"]),
                          atol=1e-6)
    assert torch.allclose(_head(TrainConfig(**cfg, class_names=",".join(names))), _expected(names), atol=1e-6)


# -- refusals -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,needle", [
    ("a,b,", "is empty"),
    ("a,,b", "is empty"),
    (" , ", "is empty"),
    ("a", "two classes"),
    ("a,b,a", "more than once"),
    ("@", "names no file"),
    ("@/no/such/names.txt", "does not exist"),
])
def test_bad_class_names_are_refused_before_any_data(value, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        TrainConfig(class_names=value)
    assert "class_names" in str(e.value) or "--class-names" in str(e.value)


def test_bad_class_name_files_are_refused(tmp_path):
    for text, needle in (("a, b\nc\n", "cannot contain a comma"), ("x\n\nx\n", "more than once"),
                         ("only\n", "two classes"), ("@first\nsecond\n", "starts with '@'")):
        (tmp_path / "n.txt").write_text(text)
        with pytest.raises(ConfigError, match=needle):
            TrainConfig(class_names=f"@{tmp_path / 'n.txt'}")


def test_counts_that_do_not_match_are_refused(data):
    with pytest.raises(ConfigError, match="num_classes=2") as e:
        TrainConfig(class_names="a,b,c", num_classes=2)
    assert "--class-names" in str(e.value)
    with pytest.raises(ConfigError, match="2 names but .* has 3 classes") as e:
        prepare(_cfg(data, class_names="a,b"), torch.device("cpu"))
    assert "--class-names" in str(e.value)
    with pytest.raises(ConfigError, match="4 names but .* has 3 classes.*--num-classes 4"):
        prepare(_cfg(data, class_names="a,b,c,d"), torch.device("cpu"))
    # declared: a fourth class without examples is fine
    assert _head(_cfg(data, class_names="a,b,c,d", num_classes=4)).shape[0] == 4


# -- the command line, and evaluating later ---------------------------------------------------------------------
def test_cli_trains_with_class_names_and_eval_uses_the_stored_names(data, tmp_path, capsys):
    d, t = data
    names = tmp_path / "names.txt"
    names.write_text("\n".join(NAMES) + "\n")
    out = tmp_path / "run"
    argv = ["train", "--model", "tiny-bert", "--data", str(d), "--test-file", str(t), "--head-init", "zero-shot",
            "--epochs", "1", "--max-train", "24", "--batch-size", "8", "--threads", "1"]
    assert main([*argv, "--class-names", f"@{names}", "--output-dir", str(out)]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["class_names"] == ",".join(NAMES)
    res = json.loads((out / "results.json").read_text())
    names.write_text("something else\nentirely\nhere\n")  # the run keeps the names it was trained with
    capsys.readouterr()
    assert main(["eval", str(out), "--split", "val", "--json"]) == 0  # same w0: the fingerprint check passes
    assert json.loads(capsys.readouterr().out)["accuracy"] == res["val_acc"]
    # a bad value is one error line; so is a missing name where zero-shot needs them
    _clean_error(main([*argv, "--class-names", "a,,b"]), capsys.readouterr(), "--class-names")
    _clean_error(main([*argv, "--class-names", "a,b"]), capsys.readouterr(), "2 names but")
    err = _clean_error(main(argv), capsys.readouterr(), '--class-names "name0,name1,..."')
    assert "--head-init random" in err
    assert main(["train", "--model", "tiny-bert", "--data", str(d), "--method", "zero-shot",
                 "--class-names", "a,b,c", "--threads", "1"]) == 0


def test_shard_store_with_class_names_evaluates_from_its_stored_config(data, tmp_path, capsys):
    store = tmp_path / "store"
    train_store(_cfg(data, class_names=",".join(NAMES), lr=1e-2), store, 2, progress=False)
    cfg = load_config(TrainConfig, store / "composed" / "config.yaml")
    assert cfg.class_names == ",".join(NAMES)
    assert main(["eval", str(store / "composed"), "--json"]) == 0  # w0 rebuilt from the stored names
    assert json.loads(capsys.readouterr().out)["examples"] == 12
    res = evaluate_store(store)
    assert res["composed"] == res["ensemble_mean"]


# -- images: the names replace the class folders' ------------------------------------------------------------
def test_class_names_replace_image_class_folders(tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for k, name in enumerate(("cls_a", "cls_b")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (24, 24), (200 * k, 30 * i, 0)).save(tmp_path / split / name / f"{i}.png")
    cfg = dict(model="tiny-clip", data=f"imagefolder:{tmp_path}", head_init="zero-shot", method="fc")
    full, tok = load_clip_pair("tiny-clip")
    folders = prepare(TrainConfig(**cfg), torch.device("cpu")).clf.head.weight.detach()
    assert torch.allclose(folders, clip_logit_scale(full) * clip_text_head(full, tok, ["cls a", "cls b"]))
    named = prepare(TrainConfig(**cfg, class_names="bright,dark"), torch.device("cpu")).clf.head.weight.detach()
    assert torch.allclose(named, clip_logit_scale(full) * clip_text_head(full, tok, ["bright", "dark"]))
    assert (named - folders).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="3 names but .* has 2 classes"):
        prepare(TrainConfig(**cfg, class_names="a,b,c"), torch.device("cpu"))
