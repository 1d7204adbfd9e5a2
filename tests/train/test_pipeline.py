"""Feature cache, VJP gradients in training, a short real run, the CLI, configs and data errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from taft.cli import main
from taft.config import ConfigError, TrainConfig, load_config, save_config
from taft.data.text import default_data_root
from taft.tangent_model import TangentModel
from taft.train.cache import FeatureCache
from taft.train.loop import build_classifier, train
from taft.train.text import padded_batch, prefix_batches, tokenize
from taft.zoo import load_model, load_tokenizer
from tests.helpers import assert_close, randomize_delta

TEXTS = ["a gripping , funny film", "dull", "one of the worst movies of the year , sadly", "fine", "wow ."]


def _real_data() -> Path:
    root = default_data_root()
    if root is None or not (Path(root) / "sst2.train.txt").is_file():
        pytest.skip("shared/data/sentence-tasks not found beside the repo")
    return Path(root)


@pytest.fixture(scope="module")
def tiny_clf():
    tok = load_tokenizer("tiny-bert")
    clf = build_classifier(TrainConfig(model="tiny-bert", head_init="random"), load_model("tiny-bert"), tok, 2, None)
    return clf.double().eval(), tok


def test_feature_cache_equals_uncached_path(tiny_clf, tmp_path):
    clf, tok = tiny_clf
    tm = TangentModel(clf, "last:1")
    randomize_delta(tm, 0.1)
    ids = tokenize(tok, TEXTS, 32)
    cache = FeatureCache.build(tm, prefix_batches(ids, 2), len(ids), progress=False)
    cache.save(tmp_path / "c.safetensors")
    loaded = FeatureCache.load(tmp_path / "c.safetensors")
    idx = [4, 0, 2]  # any order, any subset
    direct = tm(**padded_batch([ids[i] for i in idx]))
    for c in (cache, loaded):
        f0, t = tm.suffix_parts(c.collate(idx))
        assert_close((f0 + t).detach(), direct.detach(), what="cached vs uncached")


def test_training_gradient_is_the_vjp_of_the_plain_network(tiny_clf):
    """The gradient the loop uses (vjp mode) equals differentiating through the tangent pass, to 1e-10."""
    clf, tok = tiny_clf
    tm = TangentModel(clf, "last:1")
    randomize_delta(tm, 0.1)
    batch = padded_batch(tokenize(tok, TEXTS, 32))
    y = torch.tensor([1, 0, 0, 1, 1])
    from taft.train.losses import rescaled_square_loss

    grads = {}
    for mode in ("vjp", "tangent"):
        tm.backward = mode
        tm.zero_grad()
        rescaled_square_loss(tm(**batch), y).backward()
        grads[mode] = torch.cat([d.grad.flatten() for d in tm.delta_dict().values()])
    assert_close(grads["vjp"], grads["tangent"], what="training gradient")


def test_config_round_trip_and_errors(tmp_path):
    cfg = TrainConfig(data="trec", epochs=3, radius=2.5)
    for suffix in ("yaml", "json"):
        p = save_config(cfg, tmp_path / f"run.{suffix}")
        assert load_config(TrainConfig, p) == cfg
    with pytest.raises(ConfigError, match="method='nope' is not valid"):
        TrainConfig(method="nope")
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    with pytest.raises(ConfigError, match="unknown option.*epochz"):
        load_config(TrainConfig, tmp_path / "bad.yaml")


@pytest.mark.slow
def test_two_epochs_on_real_data_beat_zero_shot():
    root = _real_data()
    common = dict(model="minilm", data="sst2", data_root=str(root), max_train=400, max_eval=300, seed=0)
    zs = train(TrainConfig(method="zero-shot", **common), progress=False)
    ft = train(TrainConfig(method="taft", epochs=2, **common), progress=False)
    assert ft.val_acc > zs.val_acc + 0.02, (zs.val_acc, ft.val_acc)
    assert len(ft.epochs) == 2 and ft.epochs[1]["train_loss"] < ft.epochs[0]["train_loss"]


def test_deterministic_for_a_seed(tmp_path):
    root = _real_data()
    cfg = dict(model="tiny-bert", data="trec", data_root=str(root), max_train=64, max_eval=32, epochs=1,
               head_init="random", batch_size=16)
    a = train(TrainConfig(**cfg), progress=False)
    b = train(TrainConfig(**cfg), progress=False)
    assert a.epochs[0]["train_loss"] == b.epochs[0]["train_loss"] and a.val_acc == b.val_acc


def test_cli_train_then_eval(tmp_path, capsys):
    root = _real_data()
    out = tmp_path / "run"
    code = main(["train", "--model", "tiny-bert", "--data", "trec", "--data-root", str(root), "--max-train", "64",
                 "--epochs", "1", "--head-init", "random", "--output-dir", str(out)])
    assert code == 0
    assert {"delta.safetensors", "config.yaml", "metrics.jsonl", "results.json"} <= {p.name for p in out.iterdir()}
    res = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(out), "--split", "val", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    # the checkpoint, reloaded onto a rebuilt base, reproduces the accuracy recorded at training time
    assert ev["examples"] == 545 and ev["accuracy"] == res["val_acc"]


def test_cli_config_file_and_flag_override(tmp_path, capsys):
    root = _real_data()
    save_config(TrainConfig(model="tiny-bert", data="trec", data_root=str(root), max_train=32, max_eval=16,
                            epochs=3, head_init="random"), tmp_path / "run.yaml")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--epochs", "1",
                 "--output-dir", str(tmp_path / "o")]) == 0
    assert load_config(TrainConfig, tmp_path / "o" / "config.yaml").epochs == 1


@pytest.mark.parametrize("content,expect", [
    ("", "empty"),
    ("1 fine\nnot-a-label here\n", "line 2"),
    ("0 ok\n7 bad label\n", "7"),
])
def test_bad_data_files_give_clear_errors(tmp_path, capsys, content, expect):
    (tmp_path / "d.txt").write_text(content)
    code = main(["train", "--model", "tiny-bert", "--data", str(tmp_path / "d.txt"), "--head-init", "random",
                 "--epochs", "1", "--num-classes", "2"] + (["--test-file", str(tmp_path / "d.txt")] if content else []))
    err = capsys.readouterr().err
    assert code == 2 and expect in err, err


def test_missing_data_file_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--model", "tiny-bert", "--data", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt" in capsys.readouterr().err


@pytest.mark.parametrize("method,head", [("taft", "random"), ("nlft", "random"), ("taft", "probe")])
def test_bf16_training_keeps_a_float32_master_delta_and_evaluates_as_trained(tmp_path, capsys, method, head):
    root = _real_data()
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-bert", "--data", "trec", "--data-root", str(root), "--max-train", "64",
                 "--max-eval", "64", "--epochs", "1", "--head-init", head, "--method", method,
                 "--dtype", "bfloat16", "--output-dir", str(out)]) == 0
    from safetensors.torch import load_file

    delta = load_file(str(out / "delta.safetensors"))
    assert delta and all(t.dtype == torch.float32 for t in delta.values())
    assert any(bool(t.abs().sum() > 0) for t in delta.values())
    res = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(out), "--split", "val", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == res["val_acc"]  # rebuilt in bf16, the same model


def test_dtype_is_checked_and_refused_where_not_implemented(tmp_path, capsys):
    with pytest.raises(ConfigError, match="dtype"):
        TrainConfig(dtype="float8")
    with pytest.raises(ConfigError, match="private training runs in float32"):
        TrainConfig(dtype="bfloat16", dp_epsilon=3.0, head_init="zero-shot")
    from taft.shards.training import check_shard_config

    with pytest.raises(ConfigError, match="shard stores train in float32"):
        check_shard_config(TrainConfig(dtype="bfloat16", head_init="zero-shot"))
