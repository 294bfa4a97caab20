"""Cold-start cost of one prediction: predict.py on torch, the least a torch script must do, and ONNX.

usage: python benchmarks/bench_predict.py CHECKPOINT IMAGE [--repeats 5]

All run as fresh processes, in turn, and the medians are compared. The floor script
imports torch, torchvision (and timm, which efficientnet_lite0 needs), loads the same
checkpoint with weights_only=True, builds the network by hand and runs one forward pass
on the image; it knows only efficientnet_lite0 checkpoints. The ONNX run is predict.py
on the checkpoint exported by export.py (into a temporary folder).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLOOR = r"""
import sys, torch, torchvision, timm
from torchvision import transforms as T
from PIL import Image
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
spec, pp = ckpt["model"], ckpt["preprocess"]
backbone = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
layers, width = [], backbone.num_features
for h in spec["hidden_units"]:
    layers += [torch.nn.Linear(width, h), torch.nn.ReLU(), torch.nn.Dropout(spec["dropout"])]
    width = h
if not spec["hidden_units"] and spec["dropout"] > 0:
    layers.append(torch.nn.Dropout(spec["dropout"]))
layers.append(torch.nn.Linear(width, spec["num_classes"]))
model = torch.nn.Sequential(backbone, torch.nn.Sequential(*layers))
state = {("0." if k.startswith("backbone.") else "1.") + k.split(".", 1)[1]: v for k, v in ckpt["state_dict"].items()}
model.load_state_dict(state)
tf = T.Compose([T.Resize(pp["resize_size"], T.InterpolationMode(pp["interpolation"])),
                T.CenterCrop(pp["crop_size"]), T.ToTensor(), T.Normalize(pp["mean"], pp["std"])])
with torch.inference_mode():
    p = model.eval()(tf(Image.open(sys.argv[2]).convert("RGB"))[None]).softmax(1)
print(p.topk(min(5, p.shape[1])))
"""


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="an efficientnet_lite0 checkpoint.pth made by train.py")
    p.add_argument("image", help="one image")
    p.add_argument("--repeats", type=int, default=5, help="runs of each (default: %(default)s)")
    args = p.parse_args(argv)
    ckpt, image = os.path.abspath(args.checkpoint), os.path.abspath(args.image)
    with tempfile.TemporaryDirectory() as tmp:
        onnx = os.path.join(tmp, "model.onnx")
        subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), ckpt, "--out", onnx], check=True,
                       stdout=subprocess.DEVNULL)
        predict = [sys.executable, os.path.join(ROOT, "predict.py"), image]
        runs = {"torch": predict + [ckpt], "floor": [sys.executable, "-c", FLOOR, ckpt, image],
                "onnx": predict + [onnx]}
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, cmd in runs.items():
                times[name].append(timed(cmd))
    median = {name: statistics.median(t) for name, t in times.items()}
    labels = {"torch": "predict.py CHECKPOINT", "floor": "floor script", "onnx": "predict.py model.onnx"}
    for name, t in times.items():
        print(f"{labels[name]:22s} median {median[name]:.2f}s  (runs: {', '.join(f'{x:.2f}' for x in t)})")
    print(f"predict.py on torch takes {median['torch'] / median['floor']:.2f}x the floor; "
          f"through ONNX it is {median['torch'] / median['onnx']:.1f}x faster than on torch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
