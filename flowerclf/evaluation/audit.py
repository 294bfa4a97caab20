"""The data audit, after a frozen run or alone (audit.py): likely mislabeled photos (cleanlab), duplicates, leaks.

Out-of-fold probabilities come from FOLDS linear heads trained on the frozen features training
already has (their signed square roots; full-batch L-BFGS, seconds on a CPU), their L2 penalty the one of
WEIGHT_DECAYS whose held-out log loss on the given (possibly wrong) labels is least; cleanlab's find_label_issues
ranks the photos whose folder disagrees with them. Copies come from flowerclf.evaluation.duplicates.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Sequence

import numpy as np
import torch

from flowerclf.base.errors import FlowerclfError
from flowerclf.base.files import atomic_write
from flowerclf.evaluation import audit_cache
from flowerclf.evaluation.duplicates import content_digests, duplicates_report
from flowerclf.evaluation.html import _e, _photo
from flowerclf.features.store import open_store

FOLDS = 5
SHOWN = 24          # suspects and copies with a thumbnail in report.html
# the heads' L2 penalties tried, chosen by out-of-fold log loss on the labels as given, never by planted errors;
# on flowers5-dev's efficientnet_lite0 features with 5% planted errors it is least at 0.1 or 0.3 (0.86; 1.0: 0.94)
WEIGHT_DECAYS = (0.1, 0.3, 1.0)
# L-BFGS stops when an iteration changes the loss by less (torch's default 1e-9): on 10 plantings in flowers5-dev
# the same mean recall (64.4% against 64.2%) in 0.30 s of heads instead of 0.54 (bench_audit.py's plantings)
TOLERANCE = 1e-5
SIDE_BY_SIDE_BYTES = 2 ** 27  # features up to 128 MiB (26,000 x 1,280 floats): copies and heads side by side


def _linear_head(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float) -> torch.nn.Linear:
    """A softmax regression on standardized features, fitted full-batch with L-BFGS."""
    head = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=100, line_search_fn="strong_wolfe",
                            tolerance_change=TOLERANCE, tolerance_grad=100 * TOLERANCE)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def fold_of(labels: np.ndarray, classes: int, folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Each row's fold, each class spread evenly over the folds (seeded shuffle)."""
    fold = np.empty(len(labels), int)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        rows = rng.permutation(np.flatnonzero(labels == c))
        fold[rows] = np.arange(len(rows)) % folds
    return fold


@contextmanager
def _one_thread():
    """Small full-batch fits: more threads only wait on each other (25 s instead of 1.6); their own random stream."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)


def held_out_probabilities(x: torch.Tensor, y: torch.Tensor, held: np.ndarray, classes: int,
                           weight_decay: float) -> np.ndarray:
    """The class probabilities of the `held` rows from a head fitted on the others."""
    held = torch.as_tensor(held)
    mean, std = x[~held].mean(0), x[~held].std(0) + 1e-6
    head = _linear_head((x[~held] - mean) / std, y[~held], classes, weight_decay)
    with torch.no_grad():
        return head((x[held] - mean) / std).softmax(1).double().numpy()


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, classes: int, folds: int = FOLDS,
                              seed: int = 0, weight_decay: float = WEIGHT_DECAYS[0]) -> np.ndarray:
    """Each photo's class probabilities from a head that never saw it (stratified-by-shuffle k folds)."""
    x, y = torch.as_tensor(features, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)
    fold = fold_of(labels, classes, folds, seed)
    probs = np.zeros((len(y), classes))
    with _one_thread():
        for k in range(folds):
            if (fold == k).any():
                probs[fold == k] = held_out_probabilities(x, y, fold == k, classes, weight_decay)
    return probs


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log probability of the given labels."""
    return float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12)).mean())


def head_inputs(features: np.ndarray) -> np.ndarray:
    """The features' signed square roots: pooled ReLU features are sparse and heavy-tailed, and on flowers5-dev's
    the square root lowers the out-of-fold heads' log loss on the given labels (0.884 -> 0.864 at their best)."""
    return np.sign(features) * np.sqrt(np.abs(features))


def chosen_probabilities(features: np.ndarray, labels: np.ndarray, classes: int, folds: int = FOLDS,
                         weight_decays: Sequence[float] = WEIGHT_DECAYS) -> tuple[np.ndarray, float, float]:
    """(out-of-fold probabilities, weight decay, their log loss): the heads' weight decay is the one whose head on
    the first fold's photos has the least log loss on them.

    `weight_decays` go from weak to strong; the search stops at the first that does worse than the one before,
    as the loss falls and then rises along them. One fold chooses, so the search costs one head per weight decay
    beyond the first instead of five: on 10 plantings of 5% errors in flowers5-dev it chose as all five folds'
    loss did 5 times, at the same mean recall (64.2% in the top 2x planted).
    """
    x, y = torch.as_tensor(head_inputs(features), dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)
    fold = fold_of(labels, classes, folds)
    probs = np.zeros((len(y), classes))
    with _one_thread():
        best = None
        for wd in weight_decays:
            first = held_out_probabilities(x, y, fold == 0, classes, wd)
            loss = log_loss(first, labels[fold == 0])
            if best is not None and loss >= best[1]:
                break
            best = wd, loss, first
        wd, _, probs[fold == 0] = best
        for k in range(1, folds):
            if (fold == k).any():
                probs[fold == k] = held_out_probabilities(x, y, fold == k, classes, wd)
    return probs, wd, log_loss(probs, labels)


def label_suspects(probs: np.ndarray, labels: np.ndarray, ranker=None) -> list[int]:
    """Rows whose given label looks wrong, most likely first (cleanlab, ranked by self-confidence): by `ranker`'s
    process (flowerclf.evaluation.ranker) if it can, else here."""
    if len(np.unique(labels)) < 2:
        return []
    ranked = ranker.rank(probs, labels) if ranker is not None else None
    if ranked is not None:
        return ranked
    try:
        from cleanlab.filter import find_label_issues
    except ImportError as e:  # a missing or broken install: the audit's own line, not a traceback
        raise FlowerclfError(f"the data audit needs cleanlab, which failed to import ({e}): pip install -r "
                             f"requirements.txt, or pass --no_audit", exit_code=1) from None
    return [int(i) for i in find_label_issues(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1)]


def label_audit(features: Sequence[np.ndarray], labels: np.ndarray, classes: int, folds: int = FOLDS,
                ranker=None) -> dict:
    """{"weight_decay", "log_loss", "suspects": [[row, likely class, its probability, the given label's], ...]},
    most likely wrong first: cleanlab on the out-of-fold probabilities of each backbone's features (one array per
    backbone), averaged over the backbones when there are several (a weight decay chosen for each)."""
    chosen = [chosen_probabilities(x, labels, classes, folds) for x in features]
    probs = np.mean([p for p, _, _ in chosen], 0)
    return {"weight_decay": chosen[0][1] if len(chosen) == 1 else [wd for _, wd, _ in chosen],
            "log_loss": round(log_loss(probs, labels), 4),
            "suspects": [[r, int(probs[r].argmax()), float(probs[r].max()), float(probs[r, labels[r]])]
                         for r in label_suspects(probs, labels, ranker)]}


def audit(entries: list[dict], features: np.ndarray, labels: np.ndarray, classes: list[str],
          names: dict[str, str] | None = None, store=None, folds: int = FOLDS,
          more_features: Sequence[np.ndarray] = (), warn: Callable[[str], None] = print, ranker=None) -> dict:
    """The audit of a data set's photos.

    `entries` are {"path", "split", "class"} for every photo (train, valid, test), `features` and `labels`
    their rows, `more_features` other backbones' features of the same rows; labels are audited on train and
    valid, copies looked for among all of them (by `features`). With a `store`, a label audit of the same
    features and labels is reused from FLOWERCLF_STORE/audit (audit_cache); `ranker` as label_suspects'.
    """
    names = names or {}
    labels = np.asarray(labels)
    audited = np.array([e["split"] in ("train", "valid") for e in entries])
    rows = np.flatnonzero(audited)
    views = [x[rows] for x in (features, *more_features)]
    key = audit_cache.audit_key(views, labels[rows], folds, WEIGHT_DECAYS) if store is not None else None
    found = audit_cache.load(key, len(rows), len(classes), WEIGHT_DECAYS) if key else None
    reused = found is not None
    digests = content_digests([e["path"] for e in entries], store)  # here: the store's connection is this thread's
    # the copies beside the heads: faiss, Pillow's decoder and the heads' tensor ops mostly run without the GIL
    # (on flowers5-dev both take about 0.25 s); on large sets one after the other, as their copies of the vectors
    # add up (100,000 x 1,280: 52.6 s and a 4.2 GB peak side by side, 63.3 s and 3.1 GB one after the other)
    with ThreadPoolExecutor(1) as pool:
        copies = pool.submit(duplicates_report, entries, digests, features) \
            if features.nbytes <= SIDE_BY_SIDE_BYTES else None
        if not reused:
            found = label_audit(views, labels[rows], len(classes), folds, ranker)
            if key:
                audit_cache.save(key, found, warn)
        duplicates = copies.result() if copies else duplicates_report(entries, digests, features)
    name = lambda i: names.get(classes[i], classes[i])  # noqa: E731
    suspects = [{**entries[rows[r]], "given": name(labels[rows[r]]), "likely": name(likely), "confidence": confidence,
                 "given_probability": given} for r, likely, confidence, given in found["suspects"]]
    return {"audited": int(len(rows)), "folds": folds, "weight_decay": found["weight_decay"],
            "log_loss": found["log_loss"], "reused": reused, "suspects": suspects, "duplicates": duplicates}


def summary(result: dict, page: str) -> str:
    """The line a run ends with."""
    counts = result["duplicates"]["counts"]
    return (f"audit: {len(result['suspects'])} train/valid photos look mislabeled, {counts['across_classes']} "
            f"duplicates across classes, {counts['test_in_train']} test photos also in train; see {page}")


def write_audit(result: dict, path: str) -> str:
    """audit.json, atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(result, indent=2).encode("utf-8")))
    return path


def section(result: dict, page_dir: str) -> str:
    """report.html's #audit section: the suspects and the copies, each photo a thumbnail linking to its file."""
    suspects = [_photo(s["path"], page_dir, f'{_e(s["split"])}/<b class="wrong">{_e(s["given"])}</b> looks like '
                                            f'<b>{_e(s["likely"])}</b> ({100 * s["confidence"]:.0f}%)')
                for s in result["suspects"][:SHOWN]]
    dup = result["duplicates"]
    copies = [g for g in dup["exact"] + dup["near"] if g["kind"] != "note"][:SHOWN]
    groups = "".join(
        '<div class="grid">' + "".join(_photo(p["path"], page_dir, f'{_e(p["split"])}/{_e(p["class"])}')
                                        for p in g["photos"][:4])
        + f'<p><b>{_e(g["kind"])}</b>: {"cosine " + format(g["cosine"], ".3f") if "cosine" in g else "same bytes"}'
          f'</p></div>' for g in copies)
    c = dup["counts"]
    return (f'<section id="audit"><h2>Audit: {len(result["suspects"])} of {result["audited"]} train/valid photos '
            f'look mislabeled</h2><p class="muted">cleanlab on out-of-fold predictions of {result["folds"]} heads '
            f'on the frozen features (weight decay {result["weight_decay"]}, the least held-out log loss); most '
            f'likely first, the first {SHOWN} shown (all in audit.json).</p>'
            f'<div class="grid" id="suspects">{"".join(suspects)}</div>'
            f'<h2>Duplicates and leaks</h2><p>{c["exact_groups"]} groups of identical files, {c["near_pairs"]} '
            f'near-identical pairs (feature cosine &ge; {dup["near_cosine"]}): {c["across_classes"]} across '
            f'classes, {c["within_class"]} within a class; <b>{c["test_in_train"]} test photos and '
            f'{c["valid_in_train"]} valid photos are also in train</b>, so their accuracy is inflated.</p>'
            f'<div id="copies">{groups}</div></section>')


def entries_of(splits: dict, classes: Sequence[str]) -> list[dict]:
    """{"path", "split", "class"} of every photo of `splits` (name -> ImageSet), in split order."""
    return [{"path": f, "split": name, "class": classes[label]}
            for name, images in splits.items() for f, label in zip(images.files, images.labels)]


def audit_features(splits: dict, feats: dict, classes: Sequence[str], names: dict[str, str] | None, use_store: bool,
                   log: Callable[[str], None], more_feats: Sequence[dict] = (), ranker=None) -> dict:
    """audit() of a frozen run: `feats` are its (features, labels) per split; "SPLIT plain" ones, when training
    used augmented views instead, are the center-crop features; `more_feats` other backbones' as `feats`.
    Digests come from the feature store if used."""
    started = time.perf_counter()
    parts = [[f.get(f"{name} plain", f[name]) for name in splits] for f in (feats, *more_feats)]
    stacked = [np.concatenate([x.numpy() for x, _ in p]) for p in parts]
    y = np.concatenate([labels.numpy() for _, labels in parts[0]])
    store = open_store(log) if use_store else None
    try:
        result = audit(entries_of(splits, classes), stacked[0], y, list(classes), names, store,
                       more_features=stacked[1:], warn=log, ranker=ranker)
    finally:
        if store is not None:
            store.close()
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def audit_folder(splits: dict, archs: Sequence[tuple[str, str]], names: dict[str, str] | None, device: str = "auto",
                 gpu: bool = False, engine: str = "auto", feature_batch_size: int = 0, num_workers: int | str = "auto",
                 use_store: bool = True, log: Callable[[str], None] = print) -> dict:
    """audit_features() of a data set on its own (audit.py) by each (arch, weights) of `archs`: the center-crop
    features of every split, from the feature store, the missing ones computed (with a progress line) and stored
    as a frozen train.py run does; several backbones' out-of-fold probabilities are averaged."""
    from flowerclf.data.folders import class_names
    from flowerclf.data.images import typical_pixels
    from flowerclf.features.passes import FeaturePass
    from flowerclf.models.registry import ModelSpec, build_model, freeze, resolve_weights
    from flowerclf.runtime.devices import resolve_device, resolve_feature_batch_size, resolve_num_workers

    classes = class_names(splits["train"].class_to_idx)
    dev = resolve_device(device, gpu)
    workers = resolve_num_workers(num_workers, dev, typical_pixels(splits["train"].files))
    feats = []
    for arch, weights in archs:
        weights = resolve_weights(arch, weights).spec  # the name train.py keys the store with: its vectors are reused
        model, preprocess = build_model(ModelSpec(arch, weights, [], 0.0, len(classes)))
        freeze(model.backbone)
        model.to(dev)
        with FeaturePass(model.backbone, arch, weights, preprocess, engine, dev, False,
                         resolve_feature_batch_size(feature_batch_size, dev), workers, use_store, log) as passes:
            feats.append({name: passes.features(images, name) for name, images in splits.items()})
    return audit_features(splits, feats[0], classes, names, use_store, log, feats[1:])
