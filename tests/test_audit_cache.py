"""The label audit kept for reruns: reused on the same features and labels, redone on anything else or a bad file."""
import json
import os

import numpy as np
import pytest

import cache
from flowerclf.evaluation import audit, audit_cache


def _data(seed=0, classes=3, per_class=20):
    """Separated synthetic classes with two labels moved, and their entries."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    x = (rng.normal(0, 1, (classes, 16))[labels] + rng.normal(0, 0.5, (len(labels), 16))).astype(np.float32)
    labels[[0, per_class]] = [1, 2]
    entries = [{"path": f"p{i}.png", "split": "train" if i % 4 else "valid", "class": str(c)}
               for i, c in enumerate(labels)]
    return entries, x, labels


class _Store:
    """A store whose every photo has its own content hash."""

    def digests(self, paths):
        return [p.encode() for p in paths]


def _audit(entries, x, labels, **kwargs):
    return audit.audit(entries, x, labels, ["0", "1", "2"], store=_Store(), **kwargs)


def _files():
    folder = audit_cache.cache_dir()
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.fixture
def counted(monkeypatch):
    """How many label audits were computed (not reused)."""
    calls, real = [], audit.label_audit
    monkeypatch.setattr(audit, "label_audit", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_a_rerun_on_the_same_features_and_labels_reuses_the_label_audit(counted, monkeypatch):
    entries, x, labels = _data()
    first = _audit(entries, x, labels)
    assert not first["reused"] and len(_files()) == 1 and len(counted) == 1
    assert {s["path"] for s in first["suspects"]} >= {"p0.png", "p20.png"}
    again = _audit(entries, x, labels)
    assert again["reused"] and len(counted) == 1
    assert {k: again[k] for k in ("suspects", "weight_decay", "log_loss")} == \
        {k: first[k] for k in ("suspects", "weight_decay", "log_loss")}
    relabelled = labels.copy()
    relabelled[1] = 2  # one label changed: another audit
    assert not _audit(entries, x, relabelled)["reused"] and len(counted) == 2
    assert not _audit(entries, x + 1e-3, labels)["reused"] and len(counted) == 3  # other features
    assert not _audit(entries, x, labels, more_features=[x])["reused"] and len(counted) == 4  # a second backbone
    assert len(_files()) == 4
    monkeypatch.setattr(audit, "content_digests", lambda paths, store: [p.encode() for p in paths])
    assert not audit.audit(entries, x, labels, ["0", "1", "2"], store=None)["reused"]  # --no_store: none kept
    assert len(counted) == 5 and len(_files()) == 4


@pytest.mark.parametrize("payload", [
    b"not json", b"\xff\xfe", b"[]", b"{}",
    json.dumps({"weight_decay": 0.1, "log_loss": 0.5, "suspects": [[99, 0, 0.9, 0.1]]}).encode(),  # no such row
    json.dumps({"weight_decay": 0.1, "log_loss": 0.5, "suspects": [[1, 7, 0.9, 0.1]]}).encode(),   # no such class
    json.dumps({"weight_decay": 0.1, "log_loss": 0.5, "suspects": [[1, 0, 0.9, 0.1], [1, 0, 0.9, 0.1]]}).encode(),
    json.dumps({"weight_decay": 0.1, "log_loss": 0.5, "suspects": [[1, 0, 1.5, 0.1]]}).encode(),
    json.dumps({"weight_decay": True, "log_loss": 0.5, "suspects": []}).encode(),
    json.dumps({"weight_decay": 0.1, "log_loss": 0.5, "suspects": [[True, 0, 0.9, 0.1]]}).encode(),
    b'{"weight_decay": 0.1, "log_loss": NaN, "suspects": []}',
    b'{"weight_decay": 0.1, "log_loss": 0.5, "suspects": [[1, 0, NaN, 0.1]]}',
    json.dumps({"weight_decay": 0.1, "log_loss": 0.5, "suspects": [], "x": "y" * 100000}).encode(),  # too large
])
def test_a_damaged_or_foreign_audit_file_is_audited_again_and_replaced(counted, payload):
    entries, x, labels = _data()
    first = _audit(entries, x, labels)
    (name,) = _files()
    with open(os.path.join(audit_cache.cache_dir(), name), "wb") as f:
        f.write(payload)
    again = _audit(entries, x, labels)
    assert not again["reused"] and again["suspects"] == first["suspects"] and len(counted) == 2
    assert _audit(entries, x, labels)["reused"]  # replaced by a good one


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_an_audit_path_that_is_no_file_is_audited_again_without_hanging(counted, kind):
    entries, x, labels = _data()
    _audit(entries, x, labels)
    (name,) = _files()
    path = os.path.join(audit_cache.cache_dir(), name)
    os.remove(path)
    os.mkfifo(path) if kind == "fifo" else os.symlink("/dev/zero", path)
    assert not _audit(entries, x, labels)["reused"] and len(counted) == 2
    assert os.path.isfile(path) and not os.path.islink(path) and _audit(entries, x, labels)["reused"]


def test_only_the_most_recently_used_audits_are_kept_and_nothing_else_is_touched(monkeypatch, counted):
    monkeypatch.setattr(audit_cache, "KEEP", 2)
    entries, x, labels = _data()
    os.makedirs(audit_cache.cache_dir())
    foreign = [os.path.join(audit_cache.cache_dir(), n) for n in ("notes.json", "0" * 64 + ".txt")]
    for path in foreign:
        open(path, "w").write("mine")
    for i, shift in enumerate((0.0, 1.0, 2.0)):
        _audit(entries, x + shift, labels)
        for n in _files():
            path = os.path.join(audit_cache.cache_dir(), n)
            os.utime(path, ns=(os.stat(path).st_mtime_ns - 10 ** 9,) * 2)  # older than the next one
        if i == 1:
            assert _audit(entries, x, labels)["reused"]  # used again: now the newest of the two
    assert len(counted) == 3 and all(open(p).read() == "mine" for p in foreign)
    assert _audit(entries, x, labels)["reused"] and not _audit(entries, x + 1.0, labels)["reused"]


def test_an_audit_folder_that_cannot_be_written_is_one_warning(counted):
    os.makedirs(os.path.dirname(audit_cache.cache_dir()), exist_ok=True)
    open(audit_cache.cache_dir(), "w").close()  # a file where the folder should be
    entries, x, labels = _data()
    lines = []
    result = _audit(entries, x, labels, warn=lines.append)
    assert result["suspects"] and len(lines) == 1 and "could not keep the audit for reruns" in lines[0]


def test_cache_py_shows_and_clears_the_kept_audits_only(capsys):
    entries, x, labels = _data()
    _audit(entries, x, labels)
    _audit(entries, x + 1, labels)
    foreign = os.path.join(audit_cache.cache_dir(), "readme.txt")
    open(foreign, "w").write("mine")
    assert cache.main(["info"]) == 0
    assert f"{audit_cache.cache_dir()}: 2 data audits kept for reruns" in capsys.readouterr().out
    assert cache.main(["clear", "--arch", "resnet50"]) == 0 and len(_files()) == 3  # one backbone's: audits stay
    assert cache.main(["clear"]) == 0
    assert "deleted 2 kept data audits" in capsys.readouterr().out
    assert _files() == ["readme.txt"]


def test_large_sets_look_for_copies_after_the_heads_with_the_same_result(monkeypatch):
    entries, x, labels = _data()
    side_by_side = audit.audit(entries, x, labels, ["0", "1", "2"], store=_Store())
    threads = []
    real = audit.ThreadPoolExecutor.submit
    monkeypatch.setattr(audit.ThreadPoolExecutor, "submit", lambda self, *a: threads.append(1) or real(self, *a))
    monkeypatch.setattr(audit, "SIDE_BY_SIDE_BYTES", x.nbytes - 1)
    audit_cache.clear()
    after = audit.audit(entries, x, labels, ["0", "1", "2"], store=_Store())
    assert not threads and not after["reused"]
    assert {k: v for k, v in after.items() if k != "reused"} == {k: v for k, v in side_by_side.items() if k != "reused"}
    monkeypatch.setattr(audit, "SIDE_BY_SIDE_BYTES", x.nbytes)
    audit.audit(entries, x, labels, ["0", "1", "2"], store=_Store())
    assert threads == [1]
