"""A store never gives a wrong number after a crash or a bad input (issue 19): interrupted forgets are withdrawn,
the store is bound to its data, a manifest that is not one is refused, removal keeps no id, bad K and δ and
splits are refused before any work, a lost shard file is trained again by `taft shards train`."""

from __future__ import annotations

import importlib
import sqlite3
from pathlib import Path

import pytest
import torch

from taft.checkpoint import read_delta
from taft.cli import main
from taft.config import ConfigError
from taft.shards import ShardStore, StoreError, evaluate_store, forget, train_store, verify

from .helpers import LINES, K, _cfg

# where forget looks up _compose (taft.shards.removal)
forget_module = importlib.import_module("taft.shards.removal")


class Killed(BaseException):
    """Stands for SIGKILL inside the process: not an Exception, so no audit row and no clean-up runs."""


def _ids(store: Path, shard: int) -> list[str]:
    with ShardStore(store) as st:
        return st.live_ids(shard)


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln]
    assert len(lines) == 1 and lines[0].startswith("taft: error:"), err
    return lines[0]


# -- 1. a forget killed after its commit: every reader is refused until it is finished ----------------------------
@pytest.mark.parametrize("retrain", [False, True])
def test_forget_killed_after_its_commit_serves_no_composition(store, monkeypatch, capsys, retrain):
    victim = _ids(store, 0)[0]
    real = forget_module._compose
    monkeypatch.setattr(forget_module, "_compose", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        forget(store, [victim], retrain=retrain)
    monkeypatch.setattr(forget_module, "_compose", real)
    with ShardStore(store) as st:  # the manifest says forgotten ...
        assert st.tombstone(victim) in st.forgotten_ids()
    # ... so nobody may read the old composition (built with the victim's shard)
    assert main(["eval", str(store / "composed")]) == 2
    assert "withdrawn" in _one_error(capsys)
    assert main(["shards", "eval", "--store", str(store)]) == 2
    assert "unfinished request" in _one_error(capsys)
    assert main(["shards", "status", "--store", str(store)]) == 0
    assert "unfinished" in capsys.readouterr().out
    # the next command finishes it: the new composition, without shard 0's old model
    assert verify(store)["ok"]
    with ShardStore(store) as st:
        composed = st.get_meta("composed")["shards"]
        assert (0 in composed) == retrain
    assert main(["eval", str(store / "composed")]) == 0
    assert main(["shards", "eval", "--store", str(store)]) == 0


def test_withdrawn_composition_message_names_the_fix(store, monkeypatch, capsys):
    monkeypatch.setattr(forget_module, "_compose", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        forget(store, [_ids(store, 1)[0]])
    assert main(["eval", str(store / "composed")]) == 2
    line = _one_error(capsys)
    assert "withdrawn" in line and "taft shards verify" in line


# -- 2. the store and a run are bound to their data --------------------------------------------------------------
def _relative_data(folder: Path, lines: list[str]) -> None:
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "mini.txt").write_text("\n".join(lines) + "\n")
    (folder / "data" / "mini-test.txt").write_text("\n".join(lines[:24]) + "\n")


def test_store_reads_its_own_data_from_any_folder_and_refuses_changed_files(tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _relative_data(a, LINES)
    other = [f"{(i + 1) % 3} another sentence {i}" for i in range(90)]  # same name, other data
    _relative_data(b, other)
    monkeypatch.chdir(a)
    cfg = _cfg((Path("data/mini.txt"), Path("data/mini-test.txt")))
    train_store(cfg, tmp_path / "store", K, progress=False)
    here = evaluate_store(tmp_path / "store")
    monkeypatch.chdir(b)  # another folder with its own data/mini.txt
    assert evaluate_store(tmp_path / "store") == here
    assert main(["eval", str(tmp_path / "store" / "composed")]) == 0
    with ShardStore(tmp_path / "store") as st:
        assert Path(st.get_meta("config")["data"]).is_absolute()
    # the original files change under the same path: refused, not another number
    (a / "data" / "mini-test.txt").write_text("\n".join(other[:24]) + "\n")
    assert main(["shards", "eval", "--store", str(tmp_path / "store")]) == 2
    assert "not the data" in _one_error(capsys)
    assert main(["eval", str(tmp_path / "store" / "composed")]) == 2
    assert "not the data" in _one_error(capsys)


def test_run_reads_its_own_data_from_any_folder_and_refuses_changed_files(tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _relative_data(a, LINES)
    _relative_data(b, [f"{(i + 1) % 3} another sentence {i}" for i in range(90)])
    monkeypatch.chdir(a)
    args = ["train", "--model", "tiny-bert", "--data", "data/mini.txt", "--test-file", "data/mini-test.txt",
            "--head-init", "random", "--epochs", "1", "--threads", "1", "--output-dir", str(tmp_path / "run")]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
    here = capsys.readouterr().out
    monkeypatch.chdir(b)
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
    assert capsys.readouterr().out == here
    (a / "data" / "mini-test.txt").write_text("0 a changed test file\n1 with other lines\n")
    assert main(["eval", str(tmp_path / "run")]) == 2
    assert "not the data" in _one_error(capsys)


# -- 4. a manifest that is not a store's --------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["zero-bytes", "garbage", "foreign-sqlite"])
def test_a_manifest_that_is_not_a_store_is_one_clear_error(store, how, capsys):
    db = store / "manifest.sqlite"
    for side in ("-wal", "-shm"):
        Path(f"{db}{side}").unlink(missing_ok=True)
    if how == "zero-bytes":
        db.write_bytes(b"")
    elif how == "garbage":
        db.write_bytes(bytes(range(256)) * 40)
    else:
        db.unlink()
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE people (name TEXT)")
        con.commit()
        con.close()
    for cmd in (["shards", "status"], ["shards", "eval"], ["shards", "verify"], ["shards", "compose"],
                ["shards", "forget", "--ids", "x"]):
        before = db.read_bytes()
        assert main([*cmd, "--store", str(store)]) == 2, cmd
        _one_error(capsys)
        assert db.read_bytes() == before, f"{cmd} changed a manifest it could not read"


def test_truncated_manifest_of_a_trained_store_is_not_started_over(store, data, capsys):
    shard_files = sorted(p.name for p in (store / "shards").iterdir())
    (store / "manifest.sqlite").write_bytes(b"")
    with pytest.raises(StoreError, match="truncated"):
        train_store(_cfg(data), store, K, progress=False)
    assert sorted(p.name for p in (store / "shards").iterdir()) == shard_files


# -- 5. δ of a private store is checked against its whole data set -----------------------------------------------
def test_private_store_refuses_delta_above_one_over_n(data, tmp_path):
    cfg = _cfg(data, dp_epsilon=8.0, dp_delta=0.1, epochs=1)  # 1/N = 1/81 < 0.1 < 1/(N/K)
    with pytest.raises(ConfigError, match="larger than 1/N"):
        train_store(cfg, tmp_path / "p", 8, progress=False)
    assert not (tmp_path / "p" / "shards").exists() or not any((tmp_path / "p" / "shards").iterdir())


# -- 7 / tracebacks: K, splits -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shards", ["1000000000", "0", "-3", "500"])
def test_bad_shard_counts_are_refused(data, tmp_path, shards, capsys):
    d, t = data
    rc = main(["shards", "train", "--store", str(tmp_path / "s"), "--shards", shards, "--model", "tiny-bert",
               "--data", str(d), "--test-file", str(t), "--head-init", "random", "--threads", "1"])
    assert rc == 2
    _one_error(capsys)
    assert not (tmp_path / "s" / "shards").exists() or not any((tmp_path / "s" / "shards").iterdir())


@pytest.mark.parametrize("split", ["train", "banana", ""])
def test_shards_eval_takes_held_out_splits_only(store, split, capsys):
    assert main(["shards", "eval", "--store", str(store), "--split", split]) == 2
    line = _one_error(capsys)
    assert "use val or test" in line


# -- a lost shard file: `taft shards train` (resume) trains it again ----------------------------------------------
@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_resume_retrains_a_lost_shard_file(store, data, how, capsys):
    with ShardStore(store) as st:
        row = st.shard_row(1)
    path = store / row["file"]
    before = {n: t.clone() for n, t in read_delta(path)[0].items()}
    if how == "deleted":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:50])
    assert main(["shards", "eval", "--store", str(store)]) == 2
    assert "taft shards train --store" in _one_error(capsys)
    out = train_store(_cfg(data), store, K, progress=False)
    assert out["trained"] == [1]
    with ShardStore(store) as st:
        row = st.shard_row(1)
    after = read_delta(store / row["file"])[0]
    assert all(torch.equal(before[n], after[n]) for n in before)  # the same model, trained again
    assert verify(store)["ok"]


# -- removal leaves no fingerprint -------------------------------------------------------------------------------
def test_a_completed_forget_keeps_neither_id_nor_label(store, built, tmp_path):
    victim = _ids(store, 0)[0]
    forget(store, [victim])
    dump = "\n".join(sqlite3.connect(store / "manifest.sqlite").iterdump())
    assert victim not in dump  # not in examples, audit rows or arguments
    with ShardStore(store) as st:
        stone = st.tombstone(victim)
        row = st.db.execute("SELECT label, shard FROM examples WHERE id = ?", (stone,)).fetchone()
    assert row == (-1, 0)
    with pytest.raises(StoreError, match="already forgotten"):
        forget(store, [victim])
    assert verify(store)["ok"]


def test_tombstones_are_keyed_per_store(data, tmp_path):
    for name in ("a", "b"):
        train_store(_cfg(data), tmp_path / name, K, progress=False)
    victim = _ids(tmp_path / "a", 0)[0]
    stones = []
    for name in ("a", "b"):
        with ShardStore(tmp_path / name) as st:
            stones.append(st.tombstone(victim))
    assert stones[0] != stones[1] and all(s.startswith("forgotten:") and victim not in s for s in stones)


def test_legacy_forgotten_ids_become_tombstones(store):
    victim = _ids(store, 2)[0]
    forget(store, [victim])
    with ShardStore(store) as st:  # as an older taft left it: the id itself, and no key
        stone = st.tombstone(victim)
    con = sqlite3.connect(store / "manifest.sqlite")
    con.execute("UPDATE examples SET id = ?, label = 1 WHERE id = ?", (victim, stone))
    con.execute("DELETE FROM meta WHERE key = 'id_key'")
    con.execute("UPDATE audit SET detail = replace(detail, ?, ?)", (stone, victim))  # older logs held the ids
    con.commit()
    con.close()
    assert verify(store)["ok"]  # a write request upgrades it (audit rows of tombstones still agree)
    with ShardStore(store) as st:
        assert st.db.execute("SELECT COUNT(*) FROM examples WHERE id = ?", (victim,)).fetchone()[0] == 0
        assert st.get_meta("id_key") is not None
        assert st.forgotten_ids() == [st.tombstone(victim)]


# -- 3. a damaged features file: verify reports it, no request trains on it ------------------------------------------
@pytest.mark.parametrize("how", ["flipped", "truncated", "deleted"])
def test_damaged_features_file_is_reported_and_refused(store, how, capsys):
    with ShardStore(store) as st:
        path = store / st.feature_rows()[0]["file"]
    if how == "flipped":
        raw = bytearray(path.read_bytes())
        raw[-5] ^= 0x01  # one bit of one feature value: still a valid safetensors file
        path.write_bytes(bytes(raw))
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.unlink()
    report = verify(store)
    assert not report["ok"] and any("shard 0" in p for p in report["problems"])
    assert main(["shards", "forget", "--store", str(store), "--retrain", _ids(store, 0)[0]]) == 2
    assert "shard 0" in _one_error(capsys)
    with ShardStore(store) as st:
        assert not st.forgotten_ids()  # nothing was forgotten on damaged data
