"""Shard stores: composition equals the ensemble, exact forgetting, backends agree, crash safety, refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
import torch

from taft.checkpoint import read_delta, write_delta
from taft.cli import main
from taft.config import ConfigError, TrainConfig, from_dict
from taft.delta import weighted_average
from taft.models.classifier import Classifier
from taft.shards import ShardStore, ShardTrainer, StoreError, compose, evaluate_store, forget, train_store, verify
from taft.shards.report import shard_logits
from taft.shards.training import accuracy, vote_counts
from taft.tangent_model import TangentModel
from taft.zoo import tiny_bert

from .helpers import K, _cfg


def _composed(store: Path) -> dict[str, torch.Tensor]:
    return read_delta(store / "composed" / "delta.safetensors")[0]


def _shard_files(store: Path) -> dict[int, dict[str, torch.Tensor]]:
    with ShardStore(store) as st:
        return {r["shard"]: read_delta(store / r["file"])[0] for r in st.shard_rows() if r["status"] == "live"}


def _ids(store: Path, shard: int | None = None) -> list[str]:
    with ShardStore(store) as st:
        return st.live_ids(shard) if shard is not None else st.all_live_ids()


def _bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


# -- composition ------------------------------------------------------------------------------------------------
def test_composed_output_is_the_weighted_mean_of_shard_outputs_float64():
    """Linearity: f_lin(Σ wₖΔₖ) = Σ wₖ f_lin(Δₖ) for weights summing to 1 (the composition equals the ensemble)."""
    torch.manual_seed(0)
    tm = TangentModel(Classifier(tiny_bert(), 3, pooling="mean"), "last:1").double().eval()
    g = torch.Generator().manual_seed(1)
    deltas = [{n: 0.05 * torch.randn(t.shape, generator=g, dtype=torch.float64) for n, t in tm.delta_dict().items()}
              for _ in range(4)]
    weights = [3.0, 1.0, 2.0, 5.0]
    ids = torch.randint(5, 100, (5, 9), generator=g)
    mask = torch.ones(5, 9, dtype=torch.long)
    mask[2, 6:] = 0
    with torch.no_grad():
        tm.load_delta(weighted_average(deltas, weights))
        composed = tm(ids, mask)
        outs = []
        for d in deltas:
            tm.load_delta(d)
            outs.append(tm(ids, mask))
    mean = sum(w * o for w, o in zip(weights, outs, strict=True)) / sum(weights)
    assert (composed - mean).abs().max() <= 1e-12 * mean.abs().max()
    assert (outs[0] - outs[1]).abs().max() > 1e-3 * mean.abs().max(), "shards agree: vacuous"


def test_composed_store_output_equals_weighted_mean_float32(store):
    per_shard, _, shards = shard_logits(store, "test")
    composed, _, _ = shard_logits(store, "test", which="composed")
    with ShardStore(store) as st:
        w = torch.tensor([float(len(st.live_ids(k))) for k in shards])
    mean = (w[:, None, None] * per_shard).sum(0) / w.sum()
    assert (composed[0] - mean).abs().max() <= 1e-6 * mean.abs().max()
    assert (per_shard[0] - per_shard[1]).abs().max() > 1e-3 * mean.abs().max()
    res = evaluate_store(store)
    assert res["composed"] == res["ensemble_mean"]


def test_vote_counts_and_accuracy_against_counts_by_hand():
    # shard predictions (K=3, N=4): [0,1,2,2], [1,1,2,0], [1,0,0,1] -> votes 1, 1, 2 and a three-way tie (class 0)
    preds = torch.tensor([[0, 1, 2, 2], [1, 1, 2, 0], [1, 0, 0, 1]])
    per = torch.nn.functional.one_hot(preds, 3).float() * 5 + torch.rand(3, 4, 3)  # argmax = preds
    counts = vote_counts(per)
    assert counts.tolist() == [[1, 2, 0], [1, 2, 0], [1, 0, 2], [1, 1, 1]]
    assert counts.argmax(-1).tolist() == [1, 1, 2, 0]
    assert accuracy(counts, torch.tensor([1, 1, 2, 2])) == 0.75


def test_trainer_logits_do_not_depend_on_the_evaluation_batch(store):
    with ShardStore(store) as st:
        cfg = from_dict(TrainConfig, st.get_meta("config"))
        deltas = [read_delta(store / r["file"])[0] for r in st.shard_rows()]
    whole = ShardTrainer.from_config(cfg)
    small = ShardTrainer.from_config(dataclasses.replace(cfg, eval_batch_size=5))
    a, b = whole.logits(deltas, whole.val_features), small.logits(deltas, small.val_features)
    assert a.shape == (K, len(whole.val_labels), 3)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    one = whole.load(deltas[1])
    with torch.no_grad():
        direct = one.suffix(whole.val_features.collate(list(range(len(whole.val_features))), whole.device))
    assert (a[1] - direct).abs().max() <= 1e-5 * a.abs().max()
    assert (a[0] - a[1]).abs().max() > 1e-3 * a.abs().max(), "shards agree: vacuous"


def test_composing_one_shard_returns_it_and_weights_are_normalized(store, tmp_path):
    shards = _shard_files(store)
    compose(store, exclude=[1, 2])
    assert _bitwise(_composed(store), shards[0])
    compose(store, weights="uniform")
    uniform = _composed(store)
    (tmp_path / "w.json").write_text(json.dumps({"0": 2.0, "1": 2.0, "2": 2.0}))
    compose(store, weights=str(tmp_path / "w.json"))
    assert _bitwise(_composed(store), uniform)  # weights are normalized to sum 1
    assert verify(store)["ok"]


def test_the_composed_run_folder_is_a_normal_run(store, capsys):
    assert main(["eval", str(store / "composed"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["examples"] == 24 and 0.0 <= res["accuracy"] <= 1.0


# -- unlearning -----------------------------------------------------------------------------------------------
def test_forget_by_drop_equals_composing_without_that_shard(store, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(store, other)
    victim = _ids(store, 1)[0]
    out = forget(store, [victim])
    assert out["shards"] == [1] and out["action"] == "dropped"
    compose(other, exclude=[1])
    assert _bitwise(_composed(store), _composed(other))
    assert verify(store)["ok"]
    with ShardStore(store) as st:
        assert st.shard_row(1)["status"] == "dropped" and st.shard_row(1)["file"] is None
    assert not list((store / "shards").glob("shard-0001-*")), "the dropped shard's file must be deleted"


def test_forget_by_retrain_equals_training_from_scratch_on_the_rest(store, data):
    victim = _ids(store, 2)[1]
    remaining = [i for i in _ids(store, 2) if i != victim]
    forget(store, [victim], retrain=True)
    retrained = _shard_files(store)[2]
    trainer = ShardTrainer.from_config(_cfg(data))
    fresh = trainer.train_one(2, remaining)
    assert _bitwise(retrained, fresh.delta)
    report = verify(store)
    assert report["ok"], report["problems"]
    with ShardStore(store) as st:
        assert st.shard_row(2)["generation"] == 2
        from taft.train.cache import FeatureCache

        files = sorted(f for f in (st.root / "features").iterdir() if f.name != "val.safetensors")
        assert [st.rel(f) for f in files] == sorted(r["file"] for r in st.feature_rows().values())
        assert st.get_meta("val_features")["file"] == "features/val.safetensors"  # the one other file there
        assert len(files) == K and "shard-0002-f2" in files[2].name  # only the forgotten example's shard rewritten
        assert all(victim not in FeatureCache.load(f).ids for f in files)  # no feature row of it remains
    assert not (store / "shards" / "shard-0002-g1.safetensors").exists()


def test_forget_messages(store, capsys):
    victim = _ids(store, 0)[0]
    assert main(["shards", "forget", "--store", str(store), "--ids", "no-such-id"]) == 2
    assert "not training examples of this store" in capsys.readouterr().err
    assert main(["shards", "forget", "--store", str(store), "--ids", victim]) == 0
    assert main(["shards", "forget", "--store", str(store), "--ids", victim]) == 2
    assert "already forgotten" in capsys.readouterr().err
    assert main(["shards", "forget", "--store", str(store), "--ids", *_ids(store)]) == 2
    assert "every remaining training example" in capsys.readouterr().err
    # empty a shard completely: reported, and it leaves the composition
    rest = _ids(store, 1)
    assert main(["shards", "forget", "--store", str(store), "--ids", *rest]) == 0
    assert "now empty: [1]" in capsys.readouterr().out
    with ShardStore(store) as st:
        assert st.shard_row(1)["status"] == "empty"
        assert st.get_meta("composed")["shards"] == [2]
    assert verify(store)["ok"]


def test_concurrent_forgets_serialize(store):
    a, b = _ids(store, 0)[0], _ids(store, 1)[0]
    errors = []

    def run(i):
        try:
            forget(store, [i], retrain=True)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with ShardStore(store) as st:
        assert set(st.forgotten_ids()) == {st.tombstone(a), st.tombstone(b)}
        rows = [r for r in st.audit_rows() if r["action"] == "forget"]
    requests = [r["request"] for r in rows]
    assert requests == sorted(requests), "two forget requests interleaved in the audit log"
    assert verify(store)["ok"]


# -- backends -------------------------------------------------------------------------------------------------
def _double(trainer: ShardTrainer) -> ShardTrainer:
    from taft.train.cache import FeatureCache

    def double(f):
        return FeatureCache([{k: v.double() if v.is_floating_point() else v for k, v in it.items()} for it in f.items],
                            f.none_keys, f.constants, ids=f.ids, info=f.info)

    return ShardTrainer(trainer.cfg, trainer.clf.double(), double(trainer.features), trainer.labels,
                        val_features=double(trainer.val_features), val_labels=trainer.val_labels)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("pieces", [16, 3], ids=["whole-batches", "3-row-pieces"])
def test_batched_backend_equals_sequential(data, optimizer, pieces):
    cfg = _cfg(data, optimizer=optimizer, lr=1e-2 if optimizer == "adam" else 0.1)
    trainer = ShardTrainer.from_config(cfg)
    # 3-row pieces (batches of 8): every batch is cut and its pieces run in separate vmapped calls, regrouped by length
    trainer.rows_per_piece, trainer.call_overhead_tokens = pieces, 0 if pieces == 3 else 256
    jobs = [(k, trainer.features.ids[k::K]) for k in range(K)]
    jobs[1] = (1, jobs[1][1][:-3])  # unequal sizes: a shard runs out of batches first
    if optimizer == "sgd":  # float32, Δw itself
        seq = [trainer.train_one(k, ids) for k, ids in jobs]
        bat = trainer.train_batched(jobs)
        for s, b in zip(seq, bat, strict=True):
            scale = max(t.abs().max() for t in s.delta.values())
            assert max((s.delta[n] - b.delta[n]).abs().max() for n in s.delta) <= 1e-5 * scale
    else:
        # float64. BERT's key bias cannot change the output (softmax is shift-invariant), so its exact gradient is 0
        # and Adam's normalization turns rounding noise into steps of size lr there: it is compared through the
        # function instead, every other tensor directly.
        trainer = _double(trainer)
        trainer.rows_per_piece, trainer.call_overhead_tokens = pieces, 0 if pieces == 3 else 256
        seq = [trainer.train_one(k, ids) for k, ids in jobs]
        bat = trainer.train_batched(jobs, chunk=2)
        state = trainer.val_features.collate(list(range(len(trainer.val_features))), trainer.device)
        for s, b in zip(seq, bat, strict=True):
            scale = max(t.abs().max() for t in s.delta.values())
            noisy = [n for n in s.delta if n.endswith("attention.self.key.bias")]
            err = max((s.delta[n] - b.delta[n]).abs().max() for n in s.delta if n not in noisy)
            assert noisy and err <= 1e-10 * scale
            with torch.no_grad():
                ys, yb = trainer.load(s.delta).suffix(state), trainer.load(b.delta).suffix(state)
            assert (ys - yb).abs().max() <= 1e-10 * ys.abs().max()
    assert (seq[0].delta["head.weight"] - seq[1].delta["head.weight"]).abs().max() > 1e-4, "shards agree: vacuous"


def test_ray_backend_equals_sequential(data, tmp_path):
    pytest.importorskip("ray")
    cfg = _cfg(data, optimizer="sgd", lr=0.1)
    train_store(cfg, tmp_path / "seq", K, progress=False)
    train_store(cfg, tmp_path / "ray", K, backend="ray", progress=False)
    a, b = _shard_files(tmp_path / "seq"), _shard_files(tmp_path / "ray")
    for k in a:
        scale = max(t.abs().max() for t in a[k].values())
        assert max((a[k][n] - b[k][n]).abs().max() for n in a[k]) <= 1e-5 * scale
    assert verify(tmp_path / "ray")["ok"]


# -- crash safety and damaged stores ---------------------------------------------------------------------------
def test_kill_minus_nine_at_random_points(data, tmp_path):
    import subprocess
    import sys

    cfg = json.dumps(dataclasses.asdict(_cfg(data, epochs=1, max_train=45)))
    # its own process: its watchdog (a hang prints every stack and fails) must not kill the test session
    proc = subprocess.run([sys.executable, "-m", "taft.shards.chaos", str(tmp_path), cfg, "20", "0"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["killed"] >= 15, res
    assert res["failures"] == [], res["failures"]


def _damage(store: Path, how: str) -> None:
    with ShardStore(store) as st:
        f = store / st.shard_row(0)["file"]
    if how == "corrupt":
        raw = bytearray(f.read_bytes())
        raw[-3] ^= 0xFF
        f.write_bytes(bytes(raw))
    elif how == "truncated":
        f.write_bytes(f.read_bytes()[:100])
    elif how == "foreign":  # a valid Δw file of another base model under the shard's name
        tensors, meta = read_delta(f)
        write_delta({n: t + 1 for n, t in tensors.items()}, {**meta, "base_fingerprint": "0" * 64}, f)
    elif how == "extra":
        shutil.copy(f, store / "shards" / "shard-0009-g1.safetensors")


@pytest.mark.parametrize("how", ["corrupt", "truncated", "foreign", "extra"])
def test_damaged_store_is_reported_and_refused(store, how, capsys):
    _damage(store, how)
    report = verify(store)
    assert not report["ok"] and report["problems"]
    with pytest.raises(StoreError):
        compose(store)
    assert main(["shards", "verify", "--store", str(store)]) == 1
    assert "taft: problem:" in capsys.readouterr().err


def test_audit_log_is_append_only_and_consistent(store):
    victim = _ids(store, 0)[0]
    forget(store, [victim])
    with ShardStore(store) as st:
        rows = st.audit_rows()
        stone = st.tombstone(victim)
    assert [r["action"] for r in rows if r["outcome"] == "started"] == ["train", "forget"]
    assert verify(store)["ok"]
    con = sqlite3.connect(store / "manifest.sqlite")  # a forgotten id made live again by hand is caught
    con.execute("UPDATE examples SET forgotten_in = NULL WHERE id = ?", (stone,))
    con.commit()
    con.close()
    assert any("logged as forgotten" in p for p in verify(store)["problems"])


# -- refusals -------------------------------------------------------------------------------------------------
def test_probe_head_and_other_settings_are_refused(data, tmp_path, built, capsys):
    with pytest.raises(ConfigError, match="must not depend on training examples"):
        train_store(_cfg(data, head_init="probe"), tmp_path / "s", K)
    with pytest.raises(ConfigError, match="--method lora"):
        train_store(_cfg(data, method="lora"), tmp_path / "s", K)
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    with pytest.raises(StoreError, match="other settings"):
        train_store(_cfg(data, lr=0.5), copy, K)
    with pytest.raises(StoreError, match="other settings"):
        train_store(_cfg(data), copy, K + 1)
    assert main(["shards", "status", "--store", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    d, t = data
    assert main(["shards", "train", "--store", str(tmp_path / "z"), "--shards", "2", "--model", "tiny-bert",
                 "--data", str(d)]) == 2  # default head: zero-shot, which needs class descriptions
    assert "--head-init random" in capsys.readouterr().err


def test_resume_trains_only_the_missing_shards(built, tmp_path, data):
    store = tmp_path / "s"
    shutil.copytree(built, store)
    with ShardStore(store) as st:
        row = st.shard_row(1)
        with st.transaction() as db:  # as if the run had been killed before shard 1 finished
            db.execute("UPDATE shards SET status = 'untrained', file = NULL, sha256 = NULL WHERE shard = 1")
            db.execute("INSERT INTO pending (path) VALUES (?)", (row["file"],))
    before = _shard_files(store)
    out = train_store(_cfg(data), store, K, progress=False)
    assert out["trained"] == [1]
    after = _shard_files(store)
    assert _bitwise(before[0], after[0]) and _bitwise(before[2], after[2])
    assert verify(store)["ok"]


def test_nlft_store_composes_a_model_soup(data, tmp_path):
    cfg = dataclasses.replace(_cfg(data), method="nlft")
    train_store(cfg, tmp_path / "soup", K, progress=False)
    res = evaluate_store(tmp_path / "soup")
    assert set(res) >= {"composed", "vote", "ensemble_mean"}
    _, meta = read_delta(tmp_path / "soup" / "composed" / "delta.safetensors")
    assert meta["kind"] == "nonlinear"
    assert verify(tmp_path / "soup")["ok"]


def test_private_shards_compose_in_parallel_and_retrains_add_up(data, tmp_path):
    cfg = _cfg(data, dp_epsilon=8.0, dp_delta=1e-3, epochs=1)
    with pytest.raises(ConfigError, match="--backend batched does not train private shards"):
        train_store(cfg, tmp_path / "b", K, backend="batched")
    out = train_store(cfg, tmp_path / "p", K, progress=False)
    p = out["privacy"]
    with ShardStore(tmp_path / "p") as st:
        eps = [json.loads(r["privacy"])["epsilon"] for r in st.shard_rows()]
    assert p["composed"]["epsilon"] == max(eps) <= 8.0 and p["composed"]["composition"].startswith("parallel")
    assert p["all_releases_epsilon"] == pytest.approx(max(eps), rel=1e-9)  # one release per shard so far
    victim = _ids(tmp_path / "p", 0)[0]
    forget(tmp_path / "p", [victim], retrain=True)
    with ShardStore(tmp_path / "p") as st:
        after = st.get_meta("composed")["privacy"]
    assert after["all_releases_epsilon"] > after["composed"]["epsilon"]  # shard 0's records were released twice
    assert verify(tmp_path / "p")["ok"]
