"""Stores that grow: adding data equals training on everything with the same assignment (bitwise), the composition
stays the ensemble after every step, packages round-trip bitwise and anything else is refused with its reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from taft.checkpoint import read_delta
from taft.cli import main
from taft.data.formats import read_text_file
from taft.delta import weighted_average
from taft.shards import ShardStore, ShardTrainer, StoreError, evaluate_store, forget, status, train_store, verify
from taft.shards.grow import add_data, drop_shard, export_shard, import_shard
from taft.shards.report import shard_logits

from .helpers import LINES, K, _cfg

NEW = [f"{i % 3} another line {i} sounds {['awful', 'okay', 'great'][i % 3]} {'quite ' * (i % 3)}here"
       for i in range(45)]
OTHER = [f"{i % 3} a third source {i} reads {['poor', 'fair', 'fine'][i % 3]} {'so ' * (i % 2)}today"
         for i in range(60)]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _files(store: Path) -> dict[int, dict[str, torch.Tensor]]:
    with ShardStore(store) as st:
        return {r["shard"]: read_delta(store / r["file"])[0] for r in st.shard_rows() if r["status"] == "live"}


def _bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def _composed_is_the_ensemble(store: Path) -> None:
    """composed Δw = the size-weighted average of the live shards' files (bitwise), and its outputs the weighted
    mean of theirs (float32, 1e-6)."""
    with ShardStore(store) as st:
        info = st.get_meta("composed")
    files = _files(store)
    composed = read_delta(store / "composed" / "delta.safetensors")[0]
    assert info["shards"] == sorted(files)
    assert _bitwise(composed, weighted_average([files[k] for k in info["shards"]], info["weights"]))
    per_shard, _, shards = shard_logits(store, "test")
    out, _, _ = shard_logits(store, "test", which="composed")
    w = torch.tensor(info["weights"])
    mean = (w[:, None, None] * per_shard).sum(0) / w.sum()
    assert shards == info["shards"]
    assert (out[0] - mean).abs().max() <= 1e-6 * mean.abs().max()


@pytest.fixture()
def grown(store, tmp_path) -> Path:
    """The 3-shard store given 45 new examples as 2 new shards."""
    add_data(store, _write(tmp_path / "new.txt", NEW), num_shards=2)
    return store


# -- adding data ----------------------------------------------------------------------------------------------------
def test_a_store_trained_on_a_then_given_b_equals_one_trained_on_a_and_b(grown, data, tmp_path):
    """Shard for shard (bitwise): the models of one trainer over A ∪ B (features computed in one pass) with the
    grown store's assignment; the composition is their weighted average, bitwise, and the ensemble."""
    cfg = _cfg(data)
    trainer = ShardTrainer.from_config(cfg)
    union = read_text_file(_write(tmp_path / "ab.txt", LINES + NEW), split="train", num_classes=3)
    with ShardStore(grown) as st:
        rows = st.shard_rows()
        ids = {r["shard"]: st.live_ids(r["shard"]) for r in rows}
    assert [r["shard"] for r in rows] == [0, 1, 2, 3, 4] and all(r["status"] == "live" for r in rows)
    keep = set().union(*ids.values())
    union = union.subset([p for p, i in enumerate(union.ids) if i in keep])
    feats = trainer.prep.cache_for(trainer.template, union, "train", False, None, "")
    ref = ShardTrainer(cfg, trainer.clf, feats, dict(zip(union.ids, union.labels.tolist(), strict=True)))
    files = _files(grown)
    for k in range(5):
        assert _bitwise(files[k], ref.train_one(k, ids[k]).delta), f"shard {k}"
    assert len(ids[3]) + len(ids[4]) == len(NEW)
    _composed_is_the_ensemble(grown)
    assert verify(grown)["ok"]
    st = status(grown)
    assert [st["origins"][k]["kind"] for k in (3, 4)] == ["added", "added"]
    assert [s["kind"] for s in st["data_sources"]] == ["train", "add"]
    res = evaluate_store(grown)
    assert res["composed"] == res["ensemble_mean"] and res["shards"] == [0, 1, 2, 3, 4]


def test_add_skips_known_held_out_and_forgotten_examples_with_counts(store, tmp_path, capsys):
    with ShardStore(store) as st:
        victim = st.live_ids(0)[0]
        kept = st.live_ids(1)[0]
    forget(store, [victim])
    by_id = {read_text_file(_write(tmp_path / "one.txt", [line]), split="train", num_classes=3).ids[0]: line
             for line in LINES}
    with ShardStore(store) as st:
        train_ids = set(st.db.execute("SELECT id FROM examples").fetchall())
    held = next(line for i, line in by_id.items() if (i,) not in train_ids and i != victim)  # a validation example
    lines = NEW[:10] + [by_id[victim], by_id[kept], held]
    path = _write(tmp_path / "mixed.txt", lines)
    assert main(["shards", "add", "--store", str(store), "--data", str(path), "--strict"]) == 2
    assert "forgotten earlier" in capsys.readouterr().err
    out = add_data(store, path, num_shards=1)
    assert out["added"] == 10 and out["skipped"] == {"in_store": 1, "forgotten": 1, "held_out": 1}
    with ShardStore(store) as st:
        assert victim not in st.all_live_ids() and st.tombstone(victim) in st.forgotten_ids()
        audit = json.dumps(st.audit_rows())
    assert victim not in audit  # counts only
    with pytest.raises(StoreError, match="no new training example"):
        add_data(store, path)
    assert verify(store)["ok"]


def test_forget_and_retrain_treat_added_shards_like_the_first(grown, data):
    with ShardStore(grown) as st:
        ids = st.live_ids(4)
    forget(grown, [ids[0]], retrain=True)
    cfg = _cfg(data)
    with ShardStore(grown) as st:
        assert st.live_ids(4) == ids[1:] and st.shard_row(4)["generation"] == 2
    from taft.shards.common import _read_features, _trainer_for

    with ShardStore(grown) as st:
        trainer = _trainer_for(st, cfg, False, features=_read_features(st))
    assert _bitwise(_files(grown)[4], trainer.train_one(4, ids[1:]).delta)
    _composed_is_the_ensemble(grown)
    assert verify(grown)["ok"]


def test_default_number_of_new_shards_keeps_the_shard_size(store, tmp_path):
    out = add_data(store, _write(tmp_path / "new.txt", NEW))
    with ShardStore(store) as st:
        sizes = [r["examples"] for r in st.shard_rows()[:K]]
    assert len(out["shards"]) == round(len(NEW) / (sum(sizes) / K))


def test_cli_add_export_import(store, other, tmp_path, capsys):
    assert main(["shards", "add", "--store", str(store), "--data", str(_write(tmp_path / "n.txt", NEW)),
                 "--shards", "2"]) == 0
    assert "as shard(s) [3, 4]" in capsys.readouterr().out
    assert main(["shards", "export", "--store", str(store), "--shard", "4", "--out", str(tmp_path / "p")]) == 0
    assert main(["shards", "import", str(tmp_path / "p"), "--store", str(other)]) == 0
    assert "as shard 2" in capsys.readouterr().out
    assert "exists" in _refused(["shards", "export", "--store", str(store), "--shard", "4", "--out",
                                 str(tmp_path / "p")], capsys)
    assert "no such shard" in _refused(["shards", "export", "--store", str(store), "--shard", "9", "--out",
                                        str(tmp_path / "q")], capsys)
    assert main(["shards", "verify", "--store", str(other)]) == 0 and main(["shards", "verify", "--store",
                                                                           str(store)]) == 0
    with ShardStore(store) as st:
        actions = [a["action"] for a in st.audit_rows() if a["outcome"] == "ok"]
    assert "add" in actions and "export" in actions


# -- packages ---------------------------------------------------------------------------------------------------------
@pytest.fixture()
def other(data, tmp_path) -> Path:
    """A second store of the same setting (w0, options, classes) on other data, tested on other examples too (a
    shard trained on a store's test examples is refused)."""
    d = _write(tmp_path / "other.txt", OTHER)
    t = _write(tmp_path / "other-test.txt", [f"{i % 3} a test line {i} of the other store" for i in range(24)])
    root = tmp_path / "other-store"
    train_store(_cfg((d, t)), root, 2, progress=False)
    return root


def test_export_then_import_round_trips_bitwise(store, other, tmp_path):
    pkg = tmp_path / "pkg"
    exported = export_shard(store, 1, pkg)
    assert sorted(p.name for p in pkg.iterdir()) == ["delta.safetensors", "ids.json", "manifest.json"]
    out = import_shard(other, pkg)
    assert out["shard"] == 2 and out["ids"] == "disclosed"
    with ShardStore(store) as a, ShardStore(other) as b:
        src, dst = a.shard_row(1), b.shard_row(2)
        assert (store / src["file"]).read_bytes() == (other / dst["file"]).read_bytes()
        assert b.live_ids(2) == a.live_ids(1) and dst["examples"] == exported["shard"]["examples"]
    _composed_is_the_ensemble(other)
    assert verify(other)["ok"]
    with pytest.raises(StoreError, match="already in this store"):
        import_shard(other, pkg)
    # an imported shard has no training features here: forgetting one of its examples drops it, even with retrain
    with ShardStore(other) as b:
        victim = b.live_ids(2)[0]
    res = forget(other, [victim], retrain=True)
    assert res["imported_dropped"] == [2]
    with ShardStore(other) as b:
        assert b.shard_row(2)["status"] == "dropped"
    assert verify(other)["ok"]
    # the forgotten example cannot come back in another copy of that shard
    with pytest.raises(StoreError, match="forgotten here"):
        import_shard(other, pkg)


def test_import_refuses_a_shard_trained_on_the_stores_held_out_examples(store, data, tmp_path, capsys):
    """Like `add`, `import` never lets the store train on an example it is evaluated on: a donor shard trained on
    this store's validation examples (same content, the donor's own `train:` ids) is refused whole, with the fix."""
    with ShardStore(store) as st:
        train_ids = {i for (i,) in st.db.execute("SELECT id FROM examples")}
    by_id = {read_text_file(_write(tmp_path / "one.txt", [line]), split="train", num_classes=3).ids[0]: line
             for line in LINES}
    held = [line for i, line in by_id.items() if i not in train_ids]  # the store's validation split
    assert held
    donor = tmp_path / "donor"
    train_store(_cfg((_write(tmp_path / "donor.txt", OTHER[:30] + held), data[1])), donor, 1, progress=False)
    with ShardStore(donor) as st:
        assert {i for i in st.live_ids(0) if by_id.get(i) in held}  # the donor trained on some of them
    export_shard(donor, 0, tmp_path / "pkg")
    err = _refused(["shards", "import", str(tmp_path / "pkg"), "--store", str(store)], capsys)
    assert "validation or test split" in err and "nothing was imported" in err and "export the shard again" in err
    assert [r["shard"] for r in status(store)["shards"]] == [0, 1, 2] and verify(store)["ok"]


def _refused(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("taft: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_import_refuses_other_w0_setting_classes_and_changed_packages(store, other, data, tmp_path, capsys):
    pkg = tmp_path / "pkg"
    export_shard(store, 0, pkg)

    def variant(name: str, **kw) -> Path:
        cfg = _cfg(data, **kw)
        train_store(cfg, tmp_path / name, 2, progress=False)
        return tmp_path / name

    assert "another w0" in _refused(["shards", "import", str(pkg), "--store", str(variant("seed", seed=7))], capsys)
    err = _refused(["shards", "import", str(pkg), "--store", str(variant("lr", lr=3e-2))], capsys)
    assert "another setting: lr=0.01 (here 0.03)" in err
    four = _write(tmp_path / "four.txt", [f"{i % 4} four class line {i} {'x ' * (i % 5)}" for i in range(80)])
    train_store(_cfg((four, four)), tmp_path / "four", 2, progress=False)
    assert "classes" in _refused(["shards", "import", str(pkg), "--store", str(tmp_path / "four")], capsys)

    def changed(name: str, edit) -> Path:
        p = tmp_path / name
        shutil.copytree(pkg, p)
        edit(p)
        return p

    def flip(p: Path) -> None:
        b = bytearray((p / "delta.safetensors").read_bytes())
        b[-3] ^= 1
        (p / "delta.safetensors").write_bytes(bytes(b))

    def fake_count(p: Path) -> None:
        m = json.loads((p / "manifest.json").read_text())
        m["shard"]["examples"] += 1
        (p / "manifest.json").write_text(json.dumps(m))

    def fewer_ids(p: Path) -> None:
        ids = json.loads((p / "ids.json").read_text())["ids"][1:]
        (p / "ids.json").write_text(json.dumps({"ids": ids}))
        m = json.loads((p / "manifest.json").read_text())
        import hashlib

        m["files"]["ids.json"] = hashlib.sha256((p / "ids.json").read_bytes()).hexdigest()
        (p / "manifest.json").write_text(json.dumps(m))

    for name, edit, says in (("flip", flip, "tampered"), ("count", fake_count, "does not describe"),
                             ("ids", fewer_ids, "ids.json does not match"),
                             ("extra", lambda p: (p / "x.pkl").write_bytes(b"x"), "the package was changed")):
        assert says in _refused(["shards", "import", str(changed(name, edit)), "--store", str(other)], capsys)
    before = status(other)
    assert [r["shard"] for r in before["shards"]] == [0, 1] and verify(other)["ok"]  # nothing was imported


def test_a_shard_without_ids_can_only_be_dropped_whole(store, other, tmp_path, capsys):
    pkg = tmp_path / "pkg"
    export_shard(store, 2, pkg, ids=False)
    assert not (pkg / "ids.json").exists()
    import_shard(other, pkg)
    st = status(other)
    assert st["undisclosed"] == [2] and st["origins"][2] == {**st["origins"][2], "kind": "imported", "ids": False}
    _composed_is_the_ensemble(other)
    assert verify(other)["ok"]
    with ShardStore(store) as a:
        inside = a.live_ids(2)[0]
    err = _refused(["shards", "forget", "--store", str(other), inside], capsys)
    assert "may be in imported shard(s) [2]" in err and "taft shards drop" in err
    with ShardStore(other) as b:
        mine = b.live_ids(0)[0]
    assert forget(other, [mine])["may_remain_in"] == [2]
    assert main(["shards", "status", "--store", str(other)]) == 0
    assert "did not disclose their ids" in capsys.readouterr().out
    with pytest.raises(StoreError, match="only an imported shard whose ids were not disclosed"):
        drop_shard(other, 1)
    assert main(["shards", "drop", "--store", str(other), "--shard", "2"]) == 0
    with ShardStore(other) as b:
        assert b.shard_row(2)["status"] == "dropped" and not (other / "shards" / "shard-0002-g1.safetensors").exists()
    assert verify(other)["ok"]


# -- one way to make a shard live -------------------------------------------------------------------------------------
def test_every_request_makes_a_shard_live_through_one_helper(grown, other, tmp_path):
    """train, a forget's retrain, add and import make a shard live (its row and its `shard` audit record) through
    one helper, so no request writes a row that verify and the privacy history read differently."""
    import ast
    import re

    import taft.shards

    writers = set()
    for path in sorted(Path(taft.shards.__file__).parent.glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef):
                writers |= {f"{path.stem}.{fn.name}" for node in ast.walk(fn)
                            if isinstance(node, ast.Constant) and isinstance(node.value, str)
                            and re.search(r"\b(INSERT|UPDATE)\b.*\bshards\b.*'live'", node.value, re.S)}
    assert writers == {"common._live_shard"}
    with ShardStore(grown) as st:
        victim = st.live_ids(1)[0]
    forget(grown, [victim], retrain=True)  # shard 1's generation 2
    export_shard(grown, 3, tmp_path / "pkg")
    import_shard(other, tmp_path / "pkg")
    for root in (grown, other):
        with ShardStore(root) as st:
            records = {}
            for a in st.audit_rows():
                if a["outcome"] == "shard":
                    records[json.loads(a["detail"])["shard"]] = (a["request"], json.loads(a["detail"]))
            for r in st.shard_rows():
                request, rec = records[r["shard"]]
                assert r["trained_in"] == request and rec == {
                    "shard": r["shard"], "file": r["file"], "sha256": r["sha256"], "examples": r["examples"],
                    "generation": r["generation"], "privacy": json.loads(r["privacy"]) if r["privacy"] else None}
    with ShardStore(grown) as st:
        assert st.shard_row(1)["generation"] == 2 and st.shard_row(3)["generation"] == 1


def test_verify_cross_checks_the_data_sources(grown, other, tmp_path):
    """verify proves the recorded data sources against the manifest: each has its content hash, its examples and
    request, every shard one source, an imported shard the package's file; a changed list is reported with the fix."""
    export_shard(grown, 3, tmp_path / "pkg")
    import_shard(other, tmp_path / "pkg")

    def report(root: Path, edit) -> list[str]:
        with ShardStore(root) as st:
            sources = st.get_meta("data_sources")
            with st.transaction() as db:
                st.set_meta(db, "data_sources", edit(json.loads(json.dumps(sources))))
        problems = verify(root)["problems"]
        with ShardStore(root) as st, st.transaction() as db:
            st.set_meta(db, "data_sources", sources)
        assert all("restore the store from a backup" in p and "\n" not in p for p in problems), problems
        return problems

    def set_key(n: int, key: str, value):
        return lambda sources: [*sources[:n], {**sources[n], key: value}, *sources[n + 1:]]

    assert [s["kind"] for s in status(grown)["data_sources"]] == ["train", "add"]
    assert any("has no content hash (train)" in p
               for p in report(grown, lambda ss: [ss[0], {k: v for k, v in ss[1].items() if k != "train"}]))
    assert any("do not hash to the digest" in p for p in report(grown, set_key(1, "train", "0" * 64)))
    assert any("records 46 examples" in p for p in report(grown, set_key(1, "examples", 46)))
    assert any("no matching record" in p for p in report(grown, set_key(1, "request", 1)))
    assert any("not the store's training data digest" in p for p in report(grown, set_key(0, "train", "1" * 64)))
    assert any("[3, 4] come from no recorded data source" in p for p in report(grown, lambda ss: ss[:1]))
    assert any("listed by data sources 0 and 1" in p for p in report(grown, set_key(1, "shards", [2, 3, 4])))
    assert any("not the package" in p for p in report(other, set_key(1, "package_sha256", "2" * 64)))
    assert verify(grown)["ok"] and verify(other)["ok"]


# -- privacy ----------------------------------------------------------------------------------------------------------
def test_private_store_restates_its_guarantee_and_a_plain_shard_makes_it_non_private(data, tmp_path, capsys):
    cfg = _cfg(data, dp_epsilon=8.0, dp_delta=1e-3, epochs=1)
    root = tmp_path / "private"
    train_store(cfg, root, K, progress=False)
    add_data(root, _write(tmp_path / "new.txt", NEW), num_shards=2)
    p = status(root)["privacy"]
    assert p["composed"]["shards"] == K + 2 and p["composed"]["epsilon"] <= 8.0
    with ShardStore(root) as st:
        assert all(json.loads(r["privacy"])["epsilon"] <= 8.0 for r in st.shard_rows())
    plain = tmp_path / "plain"
    train_store(_cfg((_write(tmp_path / "other.txt", OTHER), data[1]), epochs=1), plain, K, progress=False)
    pkg = tmp_path / "pkg"
    export_shard(plain, 0, pkg)
    # a plain store's setting differs only in the privacy options, which travel with each shard
    import_shard(root, pkg)
    p = status(root)["privacy"]
    assert p["composed"] is None and p["non_private_shards"] == [K + 2]
    with ShardStore(root) as st:
        assert json.loads((root / "composed" / "results.json").read_text())["privacy"]["composed"] is None
    assert main(["shards", "status", "--store", str(root)]) == 0
    assert "NOT private" in capsys.readouterr().out
    assert verify(root)["ok"]


# -- crash safety -----------------------------------------------------------------------------------------------------
def test_kill_minus_nine_during_add_or_import_leaves_the_old_or_the_new_store(data, tmp_path):
    """Fresh interpreters train a store, add data and import a package, killed with SIGKILL at random points: a
    reader is served the old or the new composition or refused, verify passes, no addition is half committed, and
    the resumed store's shard models are the uninterrupted run's, tensor for tensor."""
    import dataclasses
    import subprocess
    import sys

    new = _write(tmp_path / "new.txt", NEW[:30])
    donor = tmp_path / "donor"
    cfg = _cfg(data, epochs=1, max_train=45)
    train_store(_cfg((_write(tmp_path / "other.txt", OTHER), data[1]), epochs=1, max_train=45), donor, 2,
                progress=False)
    export_shard(donor, 0, tmp_path / "pkg")
    proc = subprocess.run([sys.executable, "-m", "taft.shards.chaos", str(tmp_path / "trials"),
                           json.dumps(dataclasses.asdict(cfg)), "10", "1", str(new), str(tmp_path / "pkg")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["killed"] >= 7, res
    assert res["failures"] == [], res["failures"]


def test_a_killed_safetensors_write_leaves_nothing_the_next_writer_keeps(store):
    """safetensors writes through its own `.tmpXXXXXX` sibling; a kill in between left it as a stray file (found by
    the kill -9 trials above). The next writer deletes it."""
    (store / "shards" / ".tmpGebxuR").write_bytes(b"partial")
    (store / "features" / ".tmpAb12Cd").write_bytes(b"partial")
    assert verify(store)["ok"]
    assert not (store / "shards" / ".tmpGebxuR").exists() and not (store / "features" / ".tmpAb12Cd").exists()
