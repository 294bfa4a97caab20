"""serve.py as users run it: a subprocess on a model.onnx, its API, bad uploads, URLs, and its page in a browser.

The server runs on $FLOWERCLF_SERVE_PYTHON (default: this interpreter); .ci/run runs these tests again with
the inference-only install's interpreter, which has no torch.
"""
import base64
import glob
import http.client
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
from conftest import ROOT
from PIL import Image

SERVE_PYTHON = os.environ.get("FLOWERCLF_SERVE_PYTHON") or sys.executable
TOP_K = 3


def _start(*argv, timeout=60):
    """serve.py with `argv`; returns (process, first stdout line); the line names the URL.

    Its stderr (a line per request) goes to a file, so a full pipe can never block the server.
    """
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([SERVE_PYTHON, os.path.join(ROOT, "serve.py"), *argv], stdout=subprocess.PIPE,
                            stderr=log, text=True, cwd=ROOT)
    proc.log = log
    line = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not line or not line[0]:
        pytest.fail(f"serve.py did not start: {_stop(proc)}")
    return proc, line[0]


def _stop(proc):
    """End the server; returns what it wrote on stderr."""
    if proc.poll() is None:
        proc.terminate()
    proc.wait(10)
    proc.stdout.close()
    proc.log.seek(0)
    return proc.log.read()


@pytest.fixture(scope="module")
def server(trained_run):
    proc, line = _start(str(trained_run["save"] / "model.onnx"), "--port", "0", "--top_k", str(TOP_K),
                        "--category_names", trained_run["names"])
    url = line.split(" on ")[1].split()[0]
    assert urlsplit(url).hostname == "127.0.0.1"  # local unless asked otherwise
    yield urlsplit(url).port
    _stop(proc)


@pytest.fixture(scope="module")
def expected(trained_run):
    """predict.py --json on every test photo, run by the same interpreter as the server: file name -> top-k."""
    out = subprocess.run([SERVE_PYTHON, os.path.join(ROOT, "predict.py"), os.path.join(trained_run["data"], "test"),
                          str(trained_run["save"] / "model.onnx"), "--top_k", str(TOP_K),
                          "--category_names", trained_run["names"], "--json"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return {os.path.basename(r["image"]): r["predictions"] for r in json.loads(out)}


def _multipart(files):
    """A multipart/form-data body as a browser sends it: (content type, body) for [(file name, bytes)]."""
    boundary = uuid.uuid4().hex
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                    f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n" for name, data in files)
    return f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


def _request(port, method, path, body=None, headers=None):
    """(status, parsed JSON or text) of one request to the server."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    is_json = response.getheader("Content-Type", "").startswith("application/json")
    if response.status >= 400:
        assert is_json and b"\n" not in data, data  # every error is one line of JSON
    return response.status, json.loads(data) if is_json else data.decode()


def _predict(port, files):
    content_type, body = _multipart(files)
    return _request(port, "POST", "/predict", body, {"Content-Type": content_type})


def _photos(trained_run):
    return sorted(glob.glob(os.path.join(trained_run["data"], "test", "*", "*.png")))


@pytest.mark.slow
def test_predict_answers_as_predict_json_does(server, trained_run, expected):
    photos = _photos(trained_run)[:2]
    import torch
    threshold = torch.load(trained_run["save"] / "checkpoint.pth", weights_only=True)["calibration"]["threshold"]
    status, answer = _predict(server, [(os.path.basename(p), open(p, "rb").read()) for p in photos])
    assert status == 200
    assert answer == [{"image": os.path.basename(p), "predictions": expected[os.path.basename(p)],
                       "confident": expected[os.path.basename(p)][0]["probability"] >= threshold} for p in photos]
    assert len(answer[0]["predictions"]) == TOP_K and answer[0]["predictions"][0]["name"] == "pink primrose"


@pytest.mark.slow
def test_20_concurrent_requests_get_20_right_answers(server, trained_run, expected):
    photos = (_photos(trained_run) * 3)[:20]
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda p: _predict(server, [(os.path.basename(p), open(p, "rb").read())]), photos))
    assert [status for status, _ in answers] == [200] * 20
    assert [a[0]["predictions"] for _, a in answers] == [expected[os.path.basename(p)] for p in photos]


def _png_header(width, height):
    """A PNG that claims width x height pixels and holds none: Pillow's decompression-bomb check fires at open."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def _jpeg():
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("name, make, status, says", [
    ("notes.txt", lambda: b"just some text, not a photo\n", 422, "notes.txt is not an image PIL can read"),
    ("cut.jpg", lambda: _jpeg()[:600], 422, "cut.jpg cannot be read as an image"),
    ("bomb.png", lambda: _png_header(30000, 30000), 422, "bomb.png is too large to decode safely"),
    ("warned.png", lambda: _png_header(10000, 10000), 422, "warned.png is too large"),  # over 1x the limit, not 2x
    ("big.jpg", lambda: b"\0" * (30 * 2 ** 20), 413, "upload of 30.0 MB is over the limit of 20 MB"),
], ids=["text", "truncated-jpeg", "bomb", "bomb-warning", "30MB"])
@pytest.mark.slow
def test_bad_uploads_are_4xx_and_the_server_keeps_serving(server, trained_run, expected, name, make, status, says):
    answer_status, answer = _predict(server, [(name, make())])
    assert answer_status == status and says in answer["error"], answer
    good = _photos(trained_run)[0]
    assert _predict(server, [("ok.png", open(good, "rb").read())])[1][0]["predictions"] == \
        expected[os.path.basename(good)]


@pytest.mark.slow
def test_malformed_requests_are_4xx(server):
    assert _request(server, "POST", "/predict", b"x=1", {"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
    status, answer = _request(server, "POST", "/predict", b"--nope--", {"Content-Type": "multipart/form-data"})
    assert status == 400 and "not well-formed" in answer["error"]
    content_type, body = _multipart([])
    assert _request(server, "POST", "/predict", body, {"Content-Type": content_type})[0] == 400
    for length in ("-1", "x"):
        assert _request(server, "POST", "/predict", None, {"Content-Length": length})[0] == 400
    status, answer = _request(server, "DELETE", "/predict")
    assert 400 <= status < 600 and "error" in answer


@pytest.mark.parametrize("path", ["/../../../../etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                                  "/..%2f..%2f..%2fetc%2fpasswd", "//etc/passwd", "/predict/../../serve.py",
                                  "/serve.py", "/README.md", "/..\\..\\serve.py"])
@pytest.mark.slow
def test_no_url_reaches_a_file(server, path):
    for method in ("GET", "POST"):
        status, answer = _request(server, method, path, b"" if method == "POST" else None)
        assert status == 404 and "not found" in answer["error"], (method, path)
        assert "root:" not in json.dumps(answer) and "import" not in json.dumps(answer)
    assert _request(server, "GET", "/")[0] == 200  # and the server keeps answering


@pytest.mark.slow
def test_upload_names_lose_their_folders(server, trained_run):
    photo = _photos(trained_run)[0]
    status, answer = _predict(server, [("../../../tmp/evil.png", open(photo, "rb").read())])
    assert status == 200 and answer[0]["image"] == "evil.png"


@pytest.mark.slow
def test_page_is_served_and_self_contained(server):
    status, page = _request(server, "GET", "/")
    assert status == 200 and '<input id="files" type="file" accept="image/*" multiple>' in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere


@pytest.mark.slow
def test_other_host_warns_and_busy_port_is_one_line(trained_run, server):
    model = str(trained_run["save"] / "model.onnx")
    proc, line = _start(model, "--host", "0.0.0.0", "--port", "0")  # only started and stopped: no traffic
    err = _stop(proc)
    assert line.startswith("serving ") and "http://0.0.0.0:" in line
    assert err.startswith("warning: listening on 0.0.0.0:") and "reachable from other machines" in err
    busy = subprocess.run([SERVE_PYTHON, os.path.join(ROOT, "serve.py"), model, "--port", str(server)],
                          capture_output=True, text=True, timeout=60)
    err = busy.stderr.strip().splitlines()
    assert busy.returncode == 2 and len(err) == 1 and f"cannot listen on 127.0.0.1:{server}" in err[0]


@pytest.mark.slow
def test_page_in_a_browser(server, trained_run, expected, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = _photos(trained_run)[-1]
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\0" * (21 * 2 ** 20))
    browser.get(f"http://127.0.0.1:{server}/")
    browser.find_element(By.ID, "files").send_keys("\n".join([photo, str(notes), str(big)]))
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: not b.find_elements(By.CSS_SELECTOR, "#results .muted"))  # every card answered

    cards = {c.find_element(By.TAG_NAME, "h2").text: c for c in browser.find_elements(By.CSS_SELECTOR, ".card")}
    assert set(cards) == {os.path.basename(photo), "notes.txt", "big.jpg"}
    rows = cards[os.path.basename(photo)].find_elements(By.CLASS_NAME, "row")
    want = expected[os.path.basename(photo)]
    assert [r.find_element(By.CLASS_NAME, "name").text for r in rows] == [p["name"] for p in want]
    assert [r.find_element(By.CLASS_NAME, "prob").text for r in rows] == \
        [f"{100 * p['probability']:.1f}%" for p in want]
    assert [float(r.get_attribute("data-probability")) for r in rows] == [p["probability"] for p in want]
    widths = [r.find_element(By.CLASS_NAME, "bar").size["width"] / r.find_element(By.CLASS_NAME, "track").size["width"]
              for r in rows]
    assert widths == pytest.approx([p["probability"] for p in want], abs=0.01)  # bars as long as the probabilities
    assert "is not an image" in cards["notes.txt"].find_element(By.CLASS_NAME, "error").text
    assert "too large: 21.0 MB" in cards["big.jpg"].find_element(By.CLASS_NAME, "error").text

    # a photo dropped on the page goes the same way; the API then gets the same bytes
    dropped = browser.execute_async_script("""
        var done = arguments[0], canvas = document.createElement("canvas");
        canvas.width = canvas.height = 32;
        var g = canvas.getContext("2d");
        g.fillStyle = "rgb(50, 70, 230)";
        g.fillRect(0, 0, 32, 32);
        canvas.toBlob(function (blob) {
            var data = new DataTransfer(), reader = new FileReader();
            data.items.add(new File([blob], "dropped.png", {type: "image/png"}));
            document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
            reader.onload = function () { done(reader.result.split(",")[1]); };
            reader.readAsDataURL(blob);
        });
    """)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".card:first-child .row"))
    first = browser.find_element(By.CSS_SELECTOR, ".card:first-child")
    assert first.find_element(By.TAG_NAME, "h2").text == "dropped.png"
    answer = _predict(server, [("dropped.png", base64.b64decode(dropped))])[1][0]["predictions"]
    assert [r.text for r in first.find_elements(By.CLASS_NAME, "name")] == [p["name"] for p in answer]


@pytest.mark.slow
def test_not_sure_on_the_page(trained_run, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = _photos(trained_run)[0]
    for min_confidence, unsure in (("1", True), ("0", False)):
        proc, line = _start(str(trained_run["save"] / "model.onnx"), "--port", "0", "--top_k", str(TOP_K),
                            "--category_names", trained_run["names"], "--min_confidence", min_confidence)
        try:
            port = urlsplit(line.split(" on ")[1].split()[0]).port
            answer = _predict(port, [("p.png", open(photo, "rb").read())])[1][0]
            assert answer["confident"] is not unsure
            browser.get(f"http://127.0.0.1:{port}/")
            browser.find_element(By.ID, "files").send_keys(photo)
            WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".card .row"))
            marks = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".card .unsure")]
            first, second = answer["predictions"][:2]
            assert marks == ([f"not sure: {first['name']} {100 * first['probability']:.1f}%, "
                              f"{second['name']} {100 * second['probability']:.1f}%"] if unsure else [])
        finally:
            _stop(proc)


# ------------------------------------------------------------------ raw HTTP: Expect, Host, Origin, limits

def _read_response(f):
    """(status line, status, headers, body) of one response read from the socket file `f`."""
    status_line = f.readline().decode("latin-1")
    assert status_line.startswith("HTTP/1."), status_line
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    return status_line.strip(), int(status_line.split()[1]), headers, f.read(int(headers.get("content-length", 0)))


def _connect(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    return sock, sock.makefile("rb")


def _head(port, method, path, headers):
    """A request line and headers as bytes; Host is 127.0.0.1:port unless `headers` name one."""
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in {"Host": f"127.0.0.1:{port}", **headers}.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _raw(port, data):
    """(status, headers, parsed one-line JSON error or the body) of the answer to raw request bytes."""
    sock, f = _connect(port)
    with sock, f:
        sock.sendall(data)
        _, status, headers, body = _read_response(f)
    if status >= 400:
        assert headers["content-type"] == "application/json" and b"\n" not in body, body
        assert headers.get("connection") == "close"  # nothing after a refusal is read as a request
        return status, headers, json.loads(body)
    return status, headers, body


def _raw_predict(port, files, headers=None):
    content_type, body = _multipart(files)
    head = _head(port, "POST", "/predict", {"Content-Type": content_type, "Content-Length": len(body),
                                            **(headers or {})})
    return _raw(port, head + body)


def _still_serves(port, trained_run, expected):
    good = _photos(trained_run)[0]
    status, answer = _predict(port, [("ok.png", open(good, "rb").read())])
    assert status == 200 and answer[0]["predictions"] == expected[os.path.basename(good)]


def test_expect_100_continue_comes_before_the_body_and_the_connection_is_kept(server, trained_run, expected):
    photo = _photos(trained_run)[0]
    content_type, body = _multipart([(os.path.basename(photo), open(photo, "rb").read())])
    head = _head(server, "POST", "/predict", {"Content-Type": content_type, "Content-Length": len(body),
                                              "Expect": "100-continue"})
    sock, f = _connect(server)
    with sock, f:
        sock.sendall(head)
        assert _read_response(f)[:2] == ("HTTP/1.1 100 Continue", 100)  # the body is not sent yet
        sock.sendall(body)
        _, status, headers, answer = _read_response(f)
        assert status == 200 and json.loads(answer)[0]["predictions"] == expected[os.path.basename(photo)]
        assert headers.get("connection") != "close"
        sock.sendall(_head(server, "POST", "/predict", {"Content-Type": content_type,
                                                        "Content-Length": len(body)}) + body)
        _, status, _, answer = _read_response(f)  # a second request on the same connection
        assert status == 200 and json.loads(answer)[0]["image"] == os.path.basename(photo)


@pytest.mark.parametrize("headers, status, says", [
    ({"Content-Length": 30 * 2 ** 20}, 413, "upload of 30.0 MB is over the limit of 20 MB"),
    ({"Content-Length": 10, "Host": "evil.example.com"}, 421, "Host 'evil.example.com' is not this machine"),
    ({"Content-Length": 10, "Origin": "http://evil.example.com"}, 403, "Origin 'http://evil.example.com'"),
    ({"Content-Length": 10, "Content-Type": "text/plain"}, 415, "multipart/form-data"),
], ids=["too-large", "other-host", "other-origin", "not-multipart"])
def test_expect_100_continue_is_refused_on_the_headers_alone(server, trained_run, expected, headers, status, says):
    head = _head(server, "POST", "/predict", {"Content-Type": "multipart/form-data; boundary=x",
                                              "Expect": "100-continue", **headers})
    answer = _raw(server, head)  # no body sent: the refusal comes instead of 100 Continue
    assert answer[0] == status and says in answer[2]["error"], answer
    _still_serves(server, trained_run, expected)


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:{port}", "127.0.0.1.evil.example.com",
                                  "localhost.evil.example.com:{port}", "0.0.0.0:{port}", ""])
def test_other_host_names_are_refused(server, trained_run, expected, host):
    host = host.format(port=server)  # DNS rebinding: a page on another name that now resolves to 127.0.0.1
    for request in (_head(server, "GET", "/", {"Host": host}),
                    _head(server, "POST", "/predict", {"Host": host, "Content-Length": 0})):
        status, _, answer = _raw(server, request)
        assert status == 421 and f"open http://127.0.0.1:{server}/" in answer["error"], (host, answer)
    _still_serves(server, trained_run, expected)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:{port}", "localhost", "LocalHost:{port}", "[::1]:{port}"])
def test_loopback_host_names_are_served(server, host):
    status, _, page = _raw(server, _head(server, "GET", "/", {"Host": host.format(port=server)}))
    assert status == 200 and b'<input id="files"' in page


@pytest.mark.parametrize("origin", ["http://evil.example.com", "null", "http://evil.example.com:{port}",
                                    "https://127.0.0.1:{port}", "http://localhost:{port}", "http://127.0.0.1"])
def test_cross_origin_posts_are_refused(server, trained_run, expected, origin):
    photo = _photos(trained_run)[0]
    status, _, answer = _raw_predict(server, [("p.png", open(photo, "rb").read())],
                                     {"Origin": origin.format(port=server)})
    assert status == 403 and "other sites" in answer["error"], answer
    _still_serves(server, trained_run, expected)


def test_the_page_posting_from_its_own_origin_is_served(server, trained_run, expected):
    photo = _photos(trained_run)[0]
    for host in (f"127.0.0.1:{server}", f"localhost:{server}"):  # as a browser sends them from the page
        status, _, answer = _raw_predict(server, [("p.png", open(photo, "rb").read())],
                                         {"Host": host, "Origin": f"http://{host}"})
        assert status == 200 and json.loads(answer)[0]["predictions"] == expected[os.path.basename(photo)]


def test_more_files_than_max_files_is_413_before_any_is_decoded(server, trained_run, expected):
    notes = [(f"notes{i}.txt", b"not a photo") for i in range(65)]  # decoded, any of them would be a 422
    status, answer = _predict(server, notes)
    assert status == 413 and "65 parts" in answer["error"] and "at most 64 files" in answer["error"], answer
    assert _predict(server, notes[:64])[0] == 422  # 64, the default, are taken
    _still_serves(server, trained_run, expected)
    proc, line = _start(str(trained_run["save"] / "model.onnx"), "--port", "0", "--max_files", "2")
    try:
        port = urlsplit(line.split(" on ")[1].split()[0]).port
        photo = open(_photos(trained_run)[0], "rb").read()
        status, answer = _predict(port, [("a.png", photo)] * 3)
        assert status == 413 and "at most 2 files (serve.py --max_files)" in answer["error"]
        status, answer = _predict(port, [("a.png", photo)] * 2)
        assert status == 200 and len(answer) == 2
    finally:
        _stop(proc)


@pytest.mark.parametrize("request_bytes, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/9.9\r\n\r\n", 505),
    (b"BREW /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 501),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(120)) + b"\r\n", 431),
    (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 411),
    (b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 19\r\n\r\nGET /x HTTP/1.1\r\n\r\n", 404),
    (b"GET / HTTP/1.1\r\nHost: evil.example.com\r\nOrigin: http://evil.example.com\r\n\r\n", 421),
], ids=["garbage", "http-9.9", "unknown-method", "120-headers", "chunked", "no-length", "404-smuggled", "evil"])
def test_hostile_requests_get_one_line_json_and_the_server_keeps_serving(server, trained_run, expected,
                                                                         request_bytes, status):
    answer = _raw(server, request_bytes)  # _raw checks: one line of JSON, Connection: close
    assert answer[0] == status and answer[2]["error"], answer
    _still_serves(server, trained_run, expected)


def _peak_rss_mib(pid: int) -> int:
    """A process's own high-water mark of resident memory, in MiB."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) // 1024


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's peak memory from /proc")
def test_a_many_part_request_holds_one_batch_of_images_at_a_time(trained_run):
    # 1,000 tiny PNGs are a 0.2 MB request, but each becomes a 3x224x224 float32 array (0.6 MB): decoding all of
    # them before the first batch ran would take 600 MB
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 60)).save(buf, "PNG")
    proc, line = _start(str(trained_run["save"] / "model.onnx"), "--port", "0", "--max_files", "1000")
    try:
        port = urlsplit(line.split(" on ")[1].split()[0]).port
        # one full batch first: the runtime's own memory grows with the batch size, once
        assert _predict(port, [(f"{i}.png", buf.getvalue()) for i in range(32)])[0] == 200
        small = _peak_rss_mib(proc.pid)
        status, answer = _predict(port, [(f"{i}.png", buf.getvalue()) for i in range(1000)])
        assert status == 200 and len(answer) == 1000
        large = _peak_rss_mib(proc.pid)
    finally:
        _stop(proc)
    assert large < small + 150, f"peak RSS {small} MiB after one batch, {large} MiB after 1,000 images in one request"
