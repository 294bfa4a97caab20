"""Show or clear what runs keep for you: the feature store (backbone features), photo copies and data audits.

usage: python cache.py info | clear [--arch ARCH]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from flowerclf.base import cli

EXAMPLES = """examples:
  python cache.py info                          # entries and size per backbone, and where the store is
  python cache.py clear --arch densenet121      # forget densenet121's features only
  python cache.py clear                         # forget every feature, remembered file hash, copy and audit

The store is FLOWERCLF_STORE/features.sqlite (default ~/.cache/flowerclf/features.sqlite), the copies are
in FLOWERCLF_STORE/copies/, the data audits' label suspects (reused by a rerun on the same features and labels)
in FLOWERCLF_STORE/audit/. A cleared feature, copy or audit is made again the next time a run needs it.
"""


def build_parser() -> cli.ArgumentParser:
    """The command-line interface of cache.py."""
    p = cli.ArgumentParser("cache.py", __doc__, EXAMPLES)
    p.add_argument("command", choices=("info", "clear"),
                   help="info: entries and size per backbone, the working copies and the kept audits; clear: "
                        "delete entries and shrink the file, and (without --arch) delete the copies and audits")
    p.add_argument("--arch", help="only this backbone's entries, e.g. efficientnet_lite0 (default: all)")
    return p


def run(args: argparse.Namespace) -> None:
    """Print the store's contents, or clear all or one backbone's entries."""
    import sqlite3

    from flowerclf.base.errors import FlowerclfError
    from flowerclf.evaluation import audit_cache
    from flowerclf.features import store, upkeep

    path = store.default_path()
    copies, size = upkeep.copies_summary()
    if args.command == "clear" and not args.arch and copies:
        print(f"deleted {upkeep.clear_copies():,} working copies of large photos ({size / 2 ** 20:,.1f} MiB)")
    elif args.command == "info" and copies:
        print(f"{upkeep.copies_dir()}: {copies:,} working copies of large photos, {size / 2 ** 20:,.1f} MiB on disk "
              f"({size / copies / 2 ** 10:,.0f} KiB each)")
    audits, audit_bytes = audit_cache.summary()
    if args.command == "clear" and not args.arch and audits:
        print(f"deleted {audit_cache.clear():,} kept data audits ({audit_bytes / 2 ** 10:,.1f} KiB)")
    elif args.command == "info" and audits:
        print(f"{audit_cache.cache_dir()}: {audits:,} data audits kept for reruns, {audit_bytes / 2 ** 10:,.1f} KiB")
    if not os.path.exists(path):
        print(f"no feature store yet at {path}")
        return
    try:  # info only reads: it works on a read-only store and changes nothing, not even a damaged one
        with contextlib.closing(store.FeatureStore(path, print, read_only=args.command == "info")) as features:
            if args.command == "clear":
                deleted = upkeep.clear(features, args.arch)
                print(f"deleted {deleted:,} feature vectors{' of ' + args.arch if args.arch else ''}; "
                      f"{path} is now {upkeep.disk_bytes(features) / 2 ** 20:,.1f} MiB")
                return
            if features.version == 0:  # a file no run got to set up
                print(f"no feature store yet at {path} (an empty file)")
                return
            print(f"{path}: {upkeep.disk_bytes(features) / 2 ** 20:,.1f} MiB on disk, "
                  f"{upkeep.files_known(features):,} file hashes remembered")
            if features.version < store.SCHEMA_VERSION:
                print(f"note: schema version {features.version}: the next train.py or evaluate.py run rebuilds "
                      f"it as version {store.SCHEMA_VERSION}, computing its features again")
            print(f"{'arch':24s} {'weights':16s} {'setups':>6s} {'entries':>9s} {'MiB':>9s} {'bytes/vector':>12s}")
            for r in upkeep.summary(features):
                if args.arch in (None, r["arch"]):
                    print(f"{cli.printable(r['arch']):24s} {cli.printable(r['weights']):16s} {r['setups']:6d} "
                          f"{r['entries']:9,d} {r['bytes'] / 2 ** 20:9,.1f} {r['bytes'] // max(1, r['entries']):12,d}")
    except store.NewerStore as e:
        raise FlowerclfError(str(e)) from None
    except sqlite3.Error as e:
        name = getattr(e, "sqlite_errorname", "")
        if args.command == "clear" and name.startswith("SQLITE_READONLY"):
            raise FlowerclfError(f"cannot clear {path}: it is read-only to you ({e}); run cache.py clear as "
                                 f"its owner, or set FLOWERCLF_STORE to a folder of your own") from None
        if store._is_damage(e):  # only info gets here: clear sets a damaged store aside and starts anew
            raise FlowerclfError(f"{path} is damaged ({e}); the next train.py or evaluate.py run, or "
                                 f"python cache.py clear, moves it to {path}.damaged and starts a new one",
                                 exit_code=1) from None
        # e.g. a run holding the store for longer than the busy timeout
        raise FlowerclfError(f"{path}: {e}; try again when no train.py or evaluate.py run is using it",
                             exit_code=1) from None


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, show or clear the store; return the exit code."""
    return cli.run_main(build_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(main())
