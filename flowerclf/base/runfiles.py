"""RunFiles: the name of every file a run leaves in its save directory, spelled once."""
from __future__ import annotations

import os

VALIDATION_FOLDERS = ("valid", "val", "validation")  # the names a validation split's folder goes by


class RunFiles:
    """The files of one save directory. A split's report files take its folder name (`stem`); test/ gets the
    plain names (report.html, test_report.json, confusion_matrix.png)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.checkpoint = self._path("checkpoint.pth")      # the best epoch: what predict, evaluate and export read
        self.last = self._path("checkpoint_last.pth")       # the last finished epoch, for --resume
        self.history_json = self._path("history.json")
        self.history_csv = self._path("history.csv")
        self.curves = self._path("training_curves.png")
        self.onnx = self._path("model.onnx")
        self.audit = self._path("audit.json")               # the frozen run's data audit
        self.tensorboard = self._path("tensorboard")        # a folder: the run's TensorBoard event files
        self.lock = self._path(".flowerclf.lock")           # held (flock) by the run writing here
        self.previous = self._path(".flowerclf-previous")   # --overwrite: the old outputs, until a new checkpoint

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def report_json(self, stem: str = "test") -> str:
        return self._path(f"{stem}_report.json")

    def confusion(self, stem: str = "test") -> str:
        return self._path("confusion_matrix.png" if stem == "test" else f"{stem}_confusion_matrix.png")

    def reliability(self, stem: str = "test") -> str:
        return self._path("reliability.png" if stem == "test" else f"{stem}_reliability.png")

    def report_html(self, stem: str = "test") -> str:
        return self._path("report.html" if stem == "test" else f"{stem}_report.html")

    @staticmethod
    def evaluated(stem: str) -> str:
        """The stem of evaluate.py's report files for a split: its own names, so train.py's report stays."""
        return f"eval_{stem}"

    def outputs(self) -> list[str]:
        """What train.py writes: all of it describes one model, so a new run replaces all of it."""
        reports = [name for stem in ("test", *VALIDATION_FOLDERS)
                   for name in (self.report_json(stem), self.confusion(stem), self.reliability(stem),
                                self.report_html(stem))]
        return [self.checkpoint, self.last, self.history_json, self.history_csv, self.curves, *reports, self.onnx,
                self.audit, self.tensorboard]
