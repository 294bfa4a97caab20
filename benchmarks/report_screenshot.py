"""docs/report.png: report.html of a real small run in headless Chromium, where the wrong cards meet the right ones.

usage: python benchmarks/report_screenshot.py DATA_DIR [--out docs/report.png] [--test_per_class 6]

DATA_DIR's train/ and valid/ are copied whole and test/ cut to --test_per_class photos a class
(the first by name), so the highest-loss grid holds right answers besides the wrong ones; then
train.py --arch efficientnet_lite0 (offline weights, frozen, 10 epochs) writes report.html, and
Chromium (/usr/bin/chromium through chromedriver, as the browser tests drive it) shows it with
the highest-loss grid's heading at the top of the window. The PNG is cut to 256 colours to stay small.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402


def small_copy(data_dir: str, out: str, per_class: int) -> str:
    """train/ and valid/ as they are, test/ cut to `per_class` photos a class."""
    for split in ("train", "valid"):
        shutil.copytree(os.path.join(data_dir, split), os.path.join(out, split))
    for cls in sorted(os.listdir(os.path.join(data_dir, "test"))):
        os.makedirs(os.path.join(out, "test", cls))
        for name in sorted(os.listdir(os.path.join(data_dir, "test", cls)))[:per_class]:
            shutil.copy(os.path.join(data_dir, "test", cls, name), os.path.join(out, "test", cls, name))
    return out


def screenshot(page: str, png: str, width: int, height: int) -> None:
    """`page` in headless Chromium, scrolled to the highest-loss grid, saved to `png`."""
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")  # given, like the driver, so Selenium downloads neither
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--disable-background-networking", "--no-first-run",
                 "--hide-scrollbars"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        browser.get("file://" + os.path.abspath(page))
        kinds = browser.execute_script(
            "return Array.from(document.querySelectorAll('#top-losses figure'), f => f.className)")
        if "right" not in kinds or "wrong" not in kinds:
            raise SystemExit(f"the grid holds {kinds.count('wrong')} wrong and {kinds.count('right')} right cards; "
                             f"change --test_per_class so it has both")
        browser.execute_script("document.querySelector('#top-losses').parentElement.scrollIntoView()")
        raw = png + ".raw.png"
        browser.save_screenshot(raw)
    finally:
        browser.quit()
    Image.open(raw).convert("RGB").quantize(256).save(png, optimize=True)
    os.remove(raw)
    print(f"wrote {png} ({os.path.getsize(png) // 1024} KB; {kinds.count('wrong')} wrong and "
          f"{kinds.count('right')} right cards in the grid)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir")
    p.add_argument("--out", default=os.path.join("docs", "report.png"))
    p.add_argument("--test_per_class", type=int, default=6)
    p.add_argument("--size", type=int, nargs=2, default=[1200, 1050], metavar=("WIDTH", "HEIGHT"))
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="report_screenshot_")
    data = small_copy(args.data_dir, os.path.join(work, "data"), args.test_per_class)
    save = os.path.join(work, "run")
    if train.main([data, "--arch", "efficientnet_lite0", "--epochs", "10", "--save_dir", save, "--no_audit"]):
        raise SystemExit("train.py failed (above)")
    screenshot(os.path.join(save, "report.html"), args.out, *args.size)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
