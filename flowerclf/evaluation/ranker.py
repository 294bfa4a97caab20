"""cleanlab's find_label_issues in a process of its own, started before a run imports torch (torch-free).

Importing cleanlab (it imports scikit-learn, scipy.stats and pandas) is most of a warm audit's cost and holds the
GIL, so no thread can hide it; a child process imports it on another core while the run imports torch, then
ranks the out-of-fold probabilities it is sent. Anything that goes wrong there (no cleanlab, a crash, no answer
in RANK_WAIT_S) leaves the ranking to the run's own process, whose errors are the audit's usual ones.
"""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np

RANK_WAIT_S = 600
# the child: "R" once cleanlab imports ("E" and the error if not), then the ranked rows of the labels and
# probabilities the parent writes to its stdin (an .npz, loaded without pickles), as an .npy on stdout
_CHILD = r"""
import sys
sys.path[:] = [p for p in sys.path if p]  # not the working directory: a numpy.py or cleanlab/ there is not ours
import io, os
import numpy as np
try:
    from cleanlab.filter import find_label_issues
except Exception as e:
    sys.stdout.buffer.write(b"E" + repr(e).encode())
    sys.exit(0)
sys.stdout.buffer.write(b"R")
sys.stdout.flush()
data = sys.stdin.buffer.read()
if data:
    z = np.load(io.BytesIO(data), allow_pickle=False)
    rows = find_label_issues(z["labels"], z["probs"], return_indices_ranked_by="self_confidence", n_jobs=1)
    np.save(sys.stdout.buffer, np.asarray(rows, np.int64), allow_pickle=False)
sys.stdout.flush()
os._exit(0)  # now: tearing down scikit-learn, scipy and pandas takes a third of a second
"""


class Ranker:
    """The child process; a context manager that ends it. rank() -> the ranked rows, or None (do it yourself)."""

    def __init__(self):
        try:
            self.child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except OSError:  # no interpreter to start (an embedded Python), no processes left: the run does it
            self.child = None

    def rank(self, probs: np.ndarray, labels: np.ndarray) -> list[int] | None:
        """The rows find_label_issues ranks as label issues, most likely first; None if the child could not."""
        if self.child is None:
            return None
        sent = io.BytesIO()
        np.savez(sent, probs=np.asarray(probs, np.float64), labels=np.asarray(labels, np.int64))
        try:
            out, _ = self.child.communicate(sent.getvalue(), timeout=RANK_WAIT_S)
            if out[:1] != b"R":
                return None
            rows = np.load(io.BytesIO(out[1:]), allow_pickle=False)
        except (subprocess.TimeoutExpired, OSError, ValueError, EOFError):
            return None
        if rows.ndim != 1 or rows.dtype.kind != "i" or not ((rows >= 0) & (rows < len(labels))).all():
            return None
        return [int(i) for i in rows]

    def close(self) -> None:
        if self.child is None:
            return
        if self.child.poll() is None:
            self.child.kill()
        self.child.wait()
        for pipe in (self.child.stdin, self.child.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()

    def __enter__(self) -> "Ranker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
