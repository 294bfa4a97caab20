"""The feature store: keyed by content, incremental, shared, resumable after kill -9, safe with two runs, healing."""
import contextlib
import gc
import io
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import weakref

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, make_image_folder, run_script, tiny_config
from PIL import Image

import cache
import evaluate
from flowerclf.data.folders import scan_split
from flowerclf.data.images import load_rgb
from flowerclf.data.transforms import Preprocess, create_transform
from flowerclf.features import passes, store
from flowerclf.training.trainer import train


def _train(data, save, **kw) -> tuple[dict, list[str]]:
    """Train in-process; return {split: (cached, computed)} from the `features ...` lines, and all lines."""
    lines = []
    train(tiny_config(data, save, **{"engine": "torch", "overwrite": True, **kw}), log=lines.append)
    return _counts(lines), lines


def _counts(lines) -> dict:
    found = (re.fullmatch(r"features (.+): ([\d,]+) cached, ([\d,]+) computed", line) for line in lines)
    return {m[1]: (int(m[2].replace(",", "")), int(m[3].replace(",", ""))) for m in found if m}


def _vectors(cache_dir) -> dict:
    """(setup key, content hash) -> vector bytes of a store."""
    with contextlib.closing(sqlite3.connect(os.path.join(cache_dir, store.STORE_NAME))) as db:
        return {(key, digest): vector for key, digest, vector in db.execute(
            "SELECT s.key, v.digest, v.vector FROM vectors v JOIN setups s ON s.id = v.setup")}


def _train_cmd(data, save, *extra):
    return ([sys.executable, os.path.join(ROOT, "train.py"), data, "--save_dir", str(save), "--epochs", "1"] + TINY
            + list(extra))


def _edit_pixels_keep_times(path):
    """Invert a photo's pixels and put its mtime back (as copy tools do): the change must still be seen."""
    st = os.stat(path)
    img = load_rgb(path)
    Image.fromarray(255 - np.asarray(img)).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def small(tmp_path):
    """3 classes: 3 training photos each, 1 validation photo each."""
    return make_image_folder(tmp_path / "small", per_class={"train": 3, "valid": 1})


def test_only_what_changed_goes_through_the_backbone(small, tmp_path, _cache, capsys):
    assert _train(small, tmp_path / "a", store=False)[0] == {"train": (0, 9), "valid": (0, 3)}
    assert not os.path.exists(os.path.join(_cache, store.STORE_NAME))  # --no_store writes nothing
    assert _train(small, tmp_path / "a")[0] == {"train": (0, 9), "valid": (0, 3)}
    # another save dir and other head settings: nothing to compute; --no_store reads nothing
    assert _train(small, tmp_path / "b", learning_rate=0.01, hidden_units=[4])[0] == {"train": (9, 0), "valid": (3, 0)}
    assert _train(small, tmp_path / "b", store=False)[0] == {"train": (0, 9), "valid": (0, 3)}
    make_image_folder(tmp_path / "more", per_class={"train": 1}, seed=7)  # 3 new photos
    for cls in ("1", "2", "3"):
        shutil.copy(tmp_path / "more" / "train" / cls / f"{cls}_0.png", os.path.join(small, "train", cls, "new.png"))
    folder = os.path.join(small, "train", "2")  # and renamed photos, one of them moved to another class
    for name in os.listdir(folder):
        os.rename(os.path.join(folder, name), os.path.join(folder, "renamed_" + name))
    os.rename(os.path.join(folder, "renamed_2_0.png"), os.path.join(small, "train", "1", "moved.png"))
    assert _train(small, tmp_path / "a")[0]["train"] == (9, 3)
    _edit_pixels_keep_times(os.path.join(small, "train", "3", "3_1.png"))
    assert _train(small, tmp_path / "a")[0] == {"train": (11, 1), "valid": (3, 0)}
    capsys.readouterr()  # evaluate.py reads the same store
    assert evaluate.main([str(tmp_path / "a" / "checkpoint.pth"), os.path.join(small, "valid")]) == 0
    assert "features valid: 3 cached, 0 computed" in capsys.readouterr().err


def test_same_command_cold_and_warm_gives_identical_checkpoints(small, tmp_path):
    cold, _ = _train(small, tmp_path / "cold", augment_views=2)
    warm, _ = _train(small, tmp_path / "warm", augment_views=2)
    assert cold["train view 2"] == (0, 9) and warm["train view 2"] == (9, 0)
    a = torch.load(tmp_path / "cold" / "checkpoint_last.pth", weights_only=True)
    b = torch.load(tmp_path / "warm" / "checkpoint_last.pth", weights_only=True)
    assert a["history"] == [{**h, "seconds": a["history"][i]["seconds"]} for i, h in enumerate(b["history"])]
    for key in a["trained_state"]:
        assert torch.equal(a["trained_state"][key], b["trained_state"][key]), key


def test_a_view_depends_only_on_the_image_the_seed_and_the_view(image_folder):
    pp = Preprocess(32, 24)
    files = scan_split(os.path.join(image_folder, "train")).files
    a, b = load_rgb(files[0]), load_rgb(files[1])
    rng = torch.get_rng_state()
    first = create_transform(pp, view=0, seed=5)(a)
    create_transform(pp, view=0, seed=5)(b)  # another image in between changes nothing
    assert np.array_equal(create_transform(pp, view=0, seed=5)(a), first)
    assert not np.array_equal(create_transform(pp, view=1, seed=5)(a), first)
    assert not np.array_equal(create_transform(pp, view=0, seed=6)(a), first)
    assert torch.equal(torch.get_rng_state(), rng)  # training's random stream is left alone


def test_content_hash_is_remembered_per_path(tmp_path, monkeypatch):
    hashed = []
    real = store.file_digest
    monkeypatch.setattr(store, "file_digest", lambda path: hashed.append(os.path.basename(path)) or real(path))
    root = make_image_folder(tmp_path / "d", per_class={"train": 2})
    files = scan_split(os.path.join(root, "train")).files
    s = store.FeatureStore(str(tmp_path / "s.sqlite"), print)
    first = s.digests(files)
    assert len(hashed) == 6 and len(set(first)) == 6
    hashed.clear()
    assert s.digests(files) == first and hashed == []  # size and times unchanged: nothing read
    _edit_pixels_keep_times(files[0])
    moved = os.path.join(os.path.dirname(files[1]), "moved.png")
    os.rename(files[1], moved)
    again = s.digests([files[0], moved] + files[2:])
    assert hashed == ["1_0.png", "moved.png"]
    assert again[0] != first[0] and again[1:] == first[1:]


@pytest.mark.slow
def test_kill_during_the_feature_pass_then_rerun_computes_only_the_rest(tmp_path, _cache, monkeypatch):
    data = make_image_folder(tmp_path / "d", per_class={"train": 10, "valid": 1})
    cmd = _train_cmd(data, tmp_path / "s", "--feature_batch_size", "2")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path, stored = os.path.join(_cache, store.STORE_NAME), 0
    deadline = time.monotonic() + 120
    while stored < 2 and time.monotonic() < deadline:  # a batch committed: kill it mid-pass
        time.sleep(0.005)
        with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(path)) as db:
            stored = db.execute("SELECT count(*) FROM vectors").fetchone()[0]
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    kept = len(_vectors(_cache))
    assert 2 <= kept < 30 and kept % 2 == 0  # whole batches only
    assert _train(data, tmp_path / "s", epochs=1, feature_batch_size=2)[0]["train"] == (kept, 30 - kept)
    monkeypatch.setenv("FLOWERCLF_STORE", str(tmp_path / "uninterrupted"))
    _train(data, tmp_path / "u", epochs=1, feature_batch_size=2)
    assert _vectors(_cache) == _vectors(tmp_path / "uninterrupted")  # bit for bit, all 33


@pytest.mark.slow
def test_two_runs_at_once_share_one_consistent_store(small, tmp_path, _cache):
    procs = [subprocess.Popen(_train_cmd(small, tmp_path / name), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-2000:]
        assert _counts(out.splitlines()).keys() == {"train", "valid"}
    with contextlib.closing(sqlite3.connect(os.path.join(_cache, store.STORE_NAME))) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM vectors").fetchone()[0] == 12
        assert db.execute("SELECT count(*) FROM files").fetchone()[0] == 12


@pytest.mark.parametrize("start", [0, store.PAGE_SIZE], ids=["all-garbage", "pages-after-the-first"])
def test_a_damaged_store_is_one_warning_then_rebuilt(small, tmp_path, _cache, start):
    path = os.path.join(_cache, store.STORE_NAME)
    with contextlib.closing(store.open_store(print)) as s:  # a store with something in it
        s.put(s.lookup([os.path.join(small, "valid", "1", "1_0.png")], {}, "a", "b")[1], [(b"x", bytes(8))])
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(os.urandom(3 * store.PAGE_SIZE))
        f.seek(0)
        garbage = f.read()
    counts, lines = _train(small, tmp_path / "s")
    warnings = [line for line in lines if "warning" in line]
    assert len(warnings) == 1 and "is damaged" in warnings[0] and path in warnings[0]
    assert counts == {"train": (0, 9), "valid": (0, 3)} and (tmp_path / "s" / "checkpoint.pth").exists()
    with open(path + ".damaged", "rb") as f:  # set aside (its first page may have been touched)
        assert f.read()[store.PAGE_SIZE:] == garbage[store.PAGE_SIZE:]
    assert len(_vectors(_cache)) == 12  # the new store


def _cache_cli(*argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cache.main(list(argv))
    return code, out.getvalue()


def test_cache_command_shows_and_clears_by_backbone(tmp_path):
    assert _cache_cli("info")[1].startswith("no feature store yet at")
    for name in ("a", "b"):
        (tmp_path / name).write_text(name)
    s = store.open_store(print)
    for arch, dim in (("resnet18", 512), ("densenet121", 1024)):
        digests, setup, _ = s.lookup([str(tmp_path / "a"), str(tmp_path / "b")], {"backbone": arch}, arch, "DEFAULT")
        s.put(setup, [(d, bytes(4 * dim)) for d in digests])
    s.close()
    code, out = _cache_cli("info")
    assert code == 0 and "2 file hashes remembered" in out
    rows = {line.split()[0]: line.split()[3:] for line in out.splitlines()[2:]}
    assert rows == {"densenet121": ["2", "0.0", "4,096"], "resnet18": ["2", "0.0", "2,048"]}
    assert _cache_cli("clear", "--arch", "resnet18")[1].startswith("deleted 2 feature vectors of resnet18")
    assert [line.split()[0] for line in _cache_cli("info")[1].splitlines()[2:]] == ["densenet121"]
    assert _cache_cli("clear")[1].startswith("deleted 2 feature vectors;")
    code, out = _cache_cli("info")
    assert "0 file hashes remembered" in out and len(out.splitlines()) == 2


def _raw(path):
    """A plain connection to a store file, as another program (or a bug) would write to it."""
    return contextlib.closing(sqlite3.connect(str(path), isolation_level=None))


def _store_with_one_vector(folder, tmp_path, arch="resnet18", dim=512) -> tuple[str, int]:
    """A closed store in `folder` holding one `dim`-float vector; (its path, the setup id)."""
    (tmp_path / "a").write_text("a")
    path = os.path.join(folder, store.STORE_NAME)
    with contextlib.closing(store.FeatureStore(path, print)) as s:
        digests, setup, _ = s.lookup([str(tmp_path / "a")], {"backbone": arch}, arch, "DEFAULT")
        assert s.put(setup, [(digests[0], np.ones(dim, np.float32).tobytes())]) == 1
    return path, setup


def _assert_schema_intact(path):
    with _raw(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA page_size").fetchone()[0] == store.PAGE_SIZE
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"files", "setups", "vectors"} <= tables


_OPENER = """
import sys
sys.path.insert(0, sys.argv[1])
import time
from flowerclf.features import store
for line in sys.stdin:  # each line: a path to open, and the moment to, the same for both openers
    path, start = line.split()
    while time.time() < float(start):
        pass
    try:
        store.FeatureStore(path, lambda message: print(message, file=sys.stderr)).close()
        print("ok", flush=True)
    except Exception as e:
        print(f"{type(e).__name__}: {e}", flush=True)
"""


def test_two_processes_creating_a_new_store_at_once_both_open_it(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _OPENER, ROOT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for i in range(20):
            path = str(tmp_path / str(i) / store.STORE_NAME)
            start = time.time() + 0.05
            for proc in procs:
                proc.stdin.write(f"{path} {start}\n")
                proc.stdin.flush()
            assert [proc.stdout.readline().strip() for proc in procs] == ["ok", "ok"], f"repetition {i}"
            _assert_schema_intact(path)
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait(timeout=60)


def test_a_new_store_waits_while_another_run_is_creating_it(tmp_path, monkeypatch):
    path = str(tmp_path / store.STORE_NAME)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute(f"PRAGMA page_size = {store.PAGE_SIZE}")
    other.execute("BEGIN IMMEDIATE")  # another run is writing the brand-new file
    waits = []

    def sleep(seconds):  # the other run finishes while this one waits
        waits.append(seconds)
        if other.in_transaction:
            other.execute("COMMIT")
    monkeypatch.setattr(store.time, "sleep", sleep)
    store.FeatureStore(path, print).close()  # SQLite refuses its switch to WAL at once, busy timeout or not
    assert waits and not other.in_transaction
    other.close()
    _assert_schema_intact(path)


def test_a_setup_cleared_during_a_run_is_never_reused(tmp_path, _cache):
    (tmp_path / "a").write_text("a")
    warnings = []
    run = store.open_store(warnings.append)
    digests, a, _ = run.lookup([str(tmp_path / "a")], {"backbone": "A"}, "A", "DEFAULT")
    assert run.put(a, [(digests[0], np.zeros(4, np.float32).tobytes())]) == 1
    assert _cache_cli("clear")[1].startswith("deleted 1 feature vectors;")  # while the run goes on
    vector = np.ones(4, np.float32).tobytes()
    assert run.put(a, [(digests[0], vector)]) == 0 and run.put(a, [(digests[0], vector)]) == 0
    assert len(warnings) == 1 and "cleared from it during this run" in warnings[0]
    assert len(_vectors(_cache)) == 0
    digests, b, found = run.lookup([str(tmp_path / "a")], {"backbone": "B"}, "B", "DEFAULT")
    assert b != a and found == {}  # 0 stale vectors
    run.close()


DAMAGES = {"torn": lambda v: v[:10], "one-float-short": lambda v: v[:-4], "empty": lambda v: b"",
           "nan": lambda v: np.full(len(v) // 4, np.nan, np.float32).tobytes(),
           "inf": lambda v: np.array([1, np.inf, 2, 3], np.float32).tobytes()}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_vector_row_is_dropped_then_stored_again(tmp_path, _cache, damage):
    files = []
    for name in "abc":
        (tmp_path / name).write_text(name)
        files.append(str(tmp_path / name))
    warnings = []
    s = store.open_store(warnings.append)
    digests, setup, _ = s.lookup(files, {}, "a", "b")
    vectors = [(np.arange(4, dtype=np.float32) + i).tobytes() for i in range(3)]
    assert s.put(setup, zip(digests, vectors)) == 3
    with _raw(s.path) as db:
        db.execute("UPDATE vectors SET vector = ? WHERE digest = ?", (DAMAGES[damage](vectors[1]), digests[1]))
    assert s.lookup(files, {}, "a", "b")[2] == {digests[0]: vectors[0], digests[2]: vectors[2]}
    assert len(warnings) == 1 and "1 stored feature vectors were damaged" in warnings[0]
    assert s.put(setup, [(digests[1], vectors[1])]) == 1  # computed again, and its place is free
    assert s.lookup(files, {}, "a", "b")[2] == dict(zip(digests, vectors)) and len(warnings) == 1
    s.close()


def test_a_run_computes_torn_and_nan_vectors_again(small, tmp_path, _cache):
    _train(small, tmp_path / "s", epochs=1)
    path = os.path.join(_cache, store.STORE_NAME)
    with _raw(path) as db:
        (torn,), (nan,) = db.execute("SELECT digest FROM files WHERE path LIKE ? ORDER BY path LIMIT 2",
                                     (os.path.join(small, "train", "%"),))
        dim = db.execute("SELECT dim FROM setups").fetchone()[0]
        db.execute("UPDATE vectors SET vector = substr(vector, 1, length(vector) - 6) WHERE digest = ?", (torn,))
        db.execute("UPDATE vectors SET vector = ? WHERE digest = ?", (np.full(dim, np.nan, np.float32).tobytes(), nan))
    counts, lines = _train(small, tmp_path / "s", epochs=1)
    assert counts == {"train": (7, 2), "valid": (3, 0)}
    assert [line for line in lines if "warning" in line] == [
        (f"warning: feature store {path}: 2 stored feature vectors were damaged (torn, or NaN or inf); "
         f"dropped them, they are computed again")]
    stored = list(_vectors(_cache).values())
    assert len(stored) == 12 and {len(v) for v in stored} == {4 * dim}
    assert np.isfinite(np.frombuffer(b"".join(stored), np.float32)).all()


def test_a_store_of_a_newer_version_is_refused_and_left_alone(tmp_path, _cache):
    path, _ = _store_with_one_vector(_cache, tmp_path)
    with _raw(path) as db:
        db.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION + 1}")
    with open(path, "rb") as f:
        before = f.read()
    warnings = []
    assert store.open_store(warnings.append) is None
    assert len(warnings) == 1 and path in warnings[0] and f"schema version {store.SCHEMA_VERSION + 1}" in warnings[0]
    assert "upgrade flowerclf" in warnings[0] and "FLOWERCLF_STORE" in warnings[0]
    for command in ("info", "clear"):
        code, out, err = run_script(cache, [command])
        assert code == 2 and out == "" and err.startswith(f"error: the feature store {path} is schema version")
        assert err.count("\n") == 1 and "upgrade flowerclf" in err
    with open(path, "rb") as f:
        assert f.read() == before
    assert sorted(os.listdir(_cache)) == [store.STORE_NAME, "onnx"]  # nothing set aside


V1_SCHEMA = """
CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                    ctime_ns INTEGER NOT NULL, digest BLOB NOT NULL);
CREATE TABLE setups (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, arch TEXT NOT NULL,
                     weights TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE vectors (setup INTEGER NOT NULL REFERENCES setups(id), digest BLOB NOT NULL,
                      vector BLOB NOT NULL, PRIMARY KEY (setup, digest));
PRAGMA user_version = 1;
"""


def test_a_store_of_an_older_version_is_rebuilt_with_one_note(tmp_path, _cache):
    path = os.path.join(_cache, store.STORE_NAME)
    with _raw(path) as db:  # as flowerclf wrote it before setup ids were never reused
        db.execute(f"PRAGMA page_size = {store.PAGE_SIZE}")
        db.executescript(V1_SCHEMA)
        db.execute("INSERT INTO files VALUES ('/photo.png', 1, 2, 3, x'00')")
        db.execute("INSERT INTO setups VALUES (1, 'k', 'resnet18', 'DEFAULT', '{}')")
        db.execute("INSERT INTO vectors VALUES (1, x'00', ?)", (bytes(2048),))
    code, out, err = run_script(cache, ["info"])  # shown as it is, and what comes next
    assert code == 0 and err == "" and "note: schema version 1: the next train.py" in out
    assert out.splitlines()[-1].split() == ["resnet18", "DEFAULT", "1", "1", "0.0", "2,048"]
    notes = []
    store.FeatureStore(path, notes.append).close()
    assert notes == [(f"note: feature store {path} was schema version 1; rebuilt it as version "
                      f"{store.SCHEMA_VERSION} (remembered file hashes kept, features are computed again as needed)")]
    _assert_schema_intact(path)
    with _raw(path) as db:
        assert db.execute("SELECT path FROM files").fetchall() == [("/photo.png",)]
        assert db.execute("SELECT (SELECT count(*) FROM setups) + (SELECT count(*) FROM vectors)").fetchone() == (0,)
    store.FeatureStore(path, notes.append).close()
    assert len(notes) == 1


def _read_only_connect(connect):
    """sqlite3.connect, but every plain (non-URI) open gets the file read-only, as for a user who cannot write it."""
    def read_only(database, *args, uri=False, **kwargs):
        if not uri:
            database, uri = "file:" + urllib.parse.quote(os.path.abspath(database)) + "?mode=ro", True
        return connect(database, *args, uri=uri, **kwargs)
    return read_only


def _snapshot(folder):
    """Every file of a folder: name -> (bytes, mtime)."""
    out = {}
    for name in os.listdir(folder):
        full = os.path.join(folder, name)
        if os.path.isfile(full):
            with open(full, "rb") as f:
                out[name] = (f.read(), os.stat(full).st_mtime_ns)
    return out


def test_cache_info_only_reads_the_store(tmp_path, _cache, monkeypatch):
    path, _ = _store_with_one_vector(_cache, tmp_path)
    before = _snapshot(_cache)
    with monkeypatch.context() as m:  # the store is read-only to us
        m.setattr(sqlite3, "connect", _read_only_connect(sqlite3.connect))
        code, out, err = run_script(cache, ["info"])
    assert code == 0 and err == "" and "1 file hashes remembered" in out
    assert out.splitlines()[-1].split() == ["resnet18", "DEFAULT", "1", "1", "0.0", "2,048"]
    assert _snapshot(_cache) == before  # the same bytes and times, and no -wal or -shm file made
    with contextlib.closing(store.open_store(print)) as run:  # a run has it open: info sees what it committed
        digests, setup, _ = run.lookup([str(tmp_path / "a")], {"backbone": "other"}, "densenet121", "DEFAULT")
        run.put(setup, [(digests[0], bytes(4096))])
        assert os.path.exists(path + "-wal")
        code, out, err = run_script(cache, ["info"])
        assert code == 0 and [line.split()[0] for line in out.splitlines()[2:]] == ["densenet121", "resnet18"]


def test_cache_info_of_a_damaged_store_says_so_and_moves_nothing(_cache):
    path = os.path.join(_cache, store.STORE_NAME)
    with open(path, "wb") as f:
        f.write(os.urandom(2 * store.PAGE_SIZE))
    before = _snapshot(_cache)
    code, out, err = run_script(cache, ["info"])
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: {path} is damaged (") and f"moves it to {path}.damaged" in err
    assert _snapshot(_cache) == before


def test_cache_clear_of_a_read_only_store_is_one_error_line(tmp_path, _cache, monkeypatch):
    path, _ = _store_with_one_vector(_cache, tmp_path)
    with monkeypatch.context() as m:
        m.setattr(sqlite3, "connect", _read_only_connect(sqlite3.connect))
        code, out, err = run_script(cache, ["clear"])
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: cannot clear {path}: it is read-only to you (") and "FLOWERCLF_STORE" in err
    assert len(_vectors(_cache)) == 1


def test_the_store_folder_takes_its_old_name_too(tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWERCLF_STORE")
    monkeypatch.setenv("FLOWERCLF_CACHE", str(tmp_path / "old"))
    assert store.default_path() == str(tmp_path / "old" / store.STORE_NAME)
    monkeypatch.setenv("FLOWERCLF_STORE", str(tmp_path / "new"))
    assert store.default_path() == str(tmp_path / "new" / store.STORE_NAME)


def test_vectors_of_one_decode_rule_never_serve_the_other(small):
    from flowerclf.features.passes import FeaturePass, setup_key
    from flowerclf.models.registry import ModelSpec, build_model

    cpu = torch.device("cpu")
    keys = [setup_key("mobilenet_v3_small", "none", "f", Preprocess(decode=rule), "torch", cpu, False)
            for rule in ("draft", "full")]
    assert keys[0] != keys[1] and [k["preprocess"]["decode"] for k in keys] == ["draft", "full"]
    torch.manual_seed(0)
    model, pp = build_model(ModelSpec("mobilenet_v3_small", "none", [8], 0.1, 3), load_pretrained=False)
    images = scan_split(os.path.join(small, "train"))
    lines = []
    for rule in ("draft", "full", "draft"):
        with FeaturePass(model.backbone, "mobilenet_v3_small", "none", Preprocess(decode=rule), "torch", cpu,
                         False, 4, 0, True, lines.append) as passes:
            passes.features(images, rule)
    assert [line for line in lines if line.startswith("features")] == [
        "features draft: 0 cached, 9 computed", "features full: 0 cached, 9 computed",
        "features draft: 9 cached, 0 computed"]


class _Batches:
    """Batches made as they are asked for (as a DataLoader does): 4 images of 2x2 pixels, then 3."""

    def __init__(self, sizes=(4, 4, 4, 3)):
        self.sizes = sizes

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self):
        start = 0
        for n in self.sizes:
            yield torch.arange(start * 12, (start + n) * 12, dtype=torch.float32).reshape(n, 3, 2, 2), \
                torch.arange(start, start + n)
            start += n


def test_a_feature_pass_keeps_no_batch(monkeypatch):
    outputs, alive = [], []

    def forward(x):
        out = x.flatten(1)[:, ::4] * 2  # a new tensor per batch, as the engines return
        outputs.append(weakref.ref(out))
        return out

    def on_batch(start, feats):
        gc.collect()
        alive.append(sum(ref() is not None for ref in outputs[:-1]))  # the batches before this one

    feats, labels = passes.extract_features(forward, _Batches(), on_batch=on_batch)
    expected = torch.arange(15 * 12, dtype=torch.float32).reshape(15, 12)[:, ::4] * 2
    assert torch.equal(feats, expected) and torch.equal(labels, torch.arange(15))
    assert alive == [0, 0, 0, 0]


_PASS_PEAK = """
import resource, sys, torch
from flowerclf.data.folders import scan_split
from flowerclf.data.transforms import Preprocess
from flowerclf.features.passes import FeaturePass
from flowerclf.models.registry import ModelSpec, build_model
torch.manual_seed(0)
model, pp = build_model(ModelSpec("mobilenet_v3_small", "none", [], 0.0, 3), load_pretrained=False)
images = scan_split(sys.argv[1])
with FeaturePass(model.backbone, "mobilenet_v3_small", "none", pp, sys.argv[2], torch.device("cpu"), False, 8, 0,
                 True, lambda line: None) as fp:
    fp.features(images, "train")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["onnxruntime"])  # on torch, fragmentation varies run to run: too weak a guard
def test_a_cold_pass_peak_memory_does_not_grow_with_the_photos(tmp_path, engine):
    def peak_mib(per_class: int) -> int:
        data = make_image_folder(tmp_path / str(per_class), per_class={"train": per_class})
        out = subprocess.run([sys.executable, "-c", _PASS_PEAK, os.path.join(data, "train"), engine], cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    # 60 batches of 8 more: a list of per-batch features grew the peak by ~5 MB a batch (torch), ~2 (ORT)
    small, large = peak_mib(8), peak_mib(168)
    assert large - small < 40, (small, large)


def test_fine_tuning_keeps_working_copies_that_cache_counts_and_clears(tmp_path, _cache):
    from flowerclf.features import upkeep

    data = make_image_folder(tmp_path / "data", classes=("1", "2"), per_class={"train": 1, "valid": 1})
    rng = np.random.default_rng(0)
    for cls in ("1", "2"):  # one photo over the working size (915 px for a 224 crop) per class
        Image.fromarray(rng.integers(0, 256, (930, 1000, 3), dtype=np.uint8)).save(
            os.path.join(data, "train", cls, "large.jpg"), quality=90)
    train(tiny_config(data, tmp_path / "off", unfreeze=1, epochs=1, engine="torch", store=False), log=print)
    assert upkeep.copies_summary() == (0, 0)  # --no_store: no copies either
    train(tiny_config(data, tmp_path / "run", unfreeze=1, epochs=1, engine="torch"), log=print)
    count, size = upkeep.copies_summary()
    assert count == 2 and size > 0  # the two large photos; the 16-px ones need none
    names = {name for _, _, files in os.walk(os.path.join(_cache, "copies", "915")) for name in files}
    assert names == {store.file_digest(os.path.join(data, "train", c, "large.jpg")).hex() + ".jpg" for c in "12"}
    (_cache / "copies" / "915" / ".flowerclf-tmp-1-x.jpg").write_bytes(b"a killed writer's")
    code, out = _cache_cli("info")
    assert code == 0 and f"2 working copies of large photos, {size / 2 ** 20:,.1f} MiB on disk" in out
    assert "working copies" not in _cache_cli("clear", "--arch", "mobilenet_v3_small")[1]
    assert upkeep.copies_summary()[0] == 2  # one backbone's features cleared: the copies stay
    code, out = _cache_cli("clear")
    assert code == 0 and out.startswith("deleted 2 working copies of large photos")
    assert upkeep.copies_summary() == (0, 0) and not os.path.exists(os.path.join(_cache, "copies"))


def test_clearing_the_copies_leaves_what_we_did_not_write(_cache):
    from flowerclf.features import upkeep
    ours = _cache / "copies" / "915" / "ab" / ("ab" + "0" * 62 + ".jpg")
    ours.parent.mkdir(parents=True)
    ours.write_bytes(b"a copy")
    theirs = _cache / "copies" / "holiday" / "beach.jpg"  # FLOWERCLF_STORE set to a folder that holds a copies/
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"someone's photo")
    assert upkeep.copies_summary() == (1, len(b"a copy"))
    assert upkeep.clear_copies() == 1
    assert not ours.exists() and not ours.parent.exists() and theirs.read_bytes() == b"someone's photo"
