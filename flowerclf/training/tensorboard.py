"""TensorBoard event files of a run (SAVE_DIR/tensorboard/): per-epoch scalars, then the report's figures as images.

torch.utils.tensorboard (and tensorboard, which it needs) is imported when the first epoch is
written, so predict.py, serve.py and the inference-only install never import it.
"""
from __future__ import annotations

import io
import os
from importlib.util import find_spec

from PIL import Image, ImageDraw

from flowerclf.base.cli import printable
from flowerclf.base.errors import FlowerclfError
from flowerclf.data.images import load_rgb, open_image

TILE_PX, CAPTION_PX, COLUMNS = 128, 40, 6  # the top-loss grid: thumbnails, three caption lines under each
RIGHT, WRONG = (40, 160, 60), (210, 40, 40)


class Board:
    """The SummaryWriter of one run (rank 0 only), opened at the first epoch it is given; a context manager that
    closes it, so a failed run keeps what its epochs wrote."""

    def __init__(self, folder: str):
        self.folder, self.writer = folder, None

    def __enter__(self) -> "Board":
        if os.path.lexists(self.folder) and not os.path.isdir(self.folder):  # else it fails after the first epoch
            raise FlowerclfError(f"{self.folder} is a file, where the run's TensorBoard event files go (a folder); "
                                 f"move it away, or pass --overwrite to set it aside with the other outputs")
        if find_spec("tensorboard") is None:  # imported at the first epoch: a traceback after it, not this line now
            raise FlowerclfError("train.py writes TensorBoard event files, and the tensorboard package is not "
                                 "installed; pip install -r requirements.txt (or pip install tensorboard)")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def epoch(self, row: dict) -> None:
        """One history row: train and valid loss, valid accuracy, the learning rate; flushed, to watch the run."""
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: TensorBoard drops what an earlier, unfinished run wrote from this epoch on (a --resume
            # redoes those epochs; a new run after a crash starts again at 1)
            self.writer = SummaryWriter(self.folder, purge_step=row["epoch"])
        step = row["epoch"]
        for tag, value in (("loss/train", row["train_loss"]), ("loss/valid", row["valid_loss"]),
                           ("accuracy/valid", row["valid_acc"]), ("learning_rate", row["lr"])):
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def finish(self, report: dict, split: str, confusion_png: str, step: int) -> bool:
        """The report's confusion matrix (the PNG it drew, when it drew one) and its top-loss grid, then close;
        False when there is nothing to add to (no epoch ran: a --resume of a finished run)."""
        if self.writer is None:
            return False
        if os.path.isfile(confusion_png):
            with open(confusion_png, "rb") as f:
                self._image(f"{split}/confusion_matrix", f.read(), step)
        if report.get("top_losses"):
            self._image(f"{split}/top_losses", top_loss_grid(report["top_losses"]), step)
        self.close()
        return True

    def _image(self, tag: str, encoded: bytes, step: int) -> None:
        """An encoded PNG or JPEG as an image event: the report's own figure, not decoded and encoded again."""
        from tensorboard.compat.proto.summary_pb2 import Summary
        with open_image(io.BytesIO(encoded)) as img:
            size, channels = img.size, len(img.getbands())
        image = Summary.Image(height=size[1], width=size[0], colorspace=channels, encoded_image_string=encoded)
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def top_loss_grid(top_losses: list[dict]) -> bytes:
    """report.html's top-loss grid as one JPEG (as a PNG it took 5x longer): each photo framed green (right) or red
    (wrong), with its true and predicted names, probability and loss."""
    rows = -(-len(top_losses) // COLUMNS)
    width = min(COLUMNS, len(top_losses)) * TILE_PX
    grid = Image.new("RGB", (width, rows * (TILE_PX + CAPTION_PX)), "white")
    draw = ImageDraw.Draw(grid)
    for i, t in enumerate(top_losses):
        x, y = i % COLUMNS * TILE_PX, i // COLUMNS * (TILE_PX + CAPTION_PX)
        try:
            photo = load_rgb(t["path"], draft=TILE_PX)
            photo.thumbnail((TILE_PX - 8, TILE_PX - 8))
        except FlowerclfError:  # gone or changed since the run read it
            photo = Image.new("RGB", (TILE_PX - 8, TILE_PX - 8), "grey")
        colour = RIGHT if t["correct"] else WRONG
        draw.rectangle([x + 1, y + 1, x + TILE_PX - 2, y + TILE_PX - 2], outline=colour, width=3)
        grid.paste(photo, (x + (TILE_PX - photo.width) // 2, y + (TILE_PX - photo.height) // 2))
        caption = (f"true: {t['true']}", f"pred: {t['predicted']} {100 * t['probability']:.0f}%",
                   f"loss {t['loss']:.3f}")
        for line, text in enumerate(caption):
            text = printable(text).replace("\n", " ").replace("\t", " ")[:22]  # class names are anyone's text
            draw.text((x + 3, y + TILE_PX + 1 + 12 * line), text, fill=colour if line == 1 else "black")
    out = io.BytesIO()
    grid.save(out, "JPEG", quality=90)
    return out.getvalue()
