"""The local prediction server: its routes, upload parsing and JSON answers, on http.server's ThreadingHTTPServer.

Torch-free with a model.onnx. Uploads are parsed in memory (the `email` package's MIME parser) and
never written to disk; the only things served are the page and POST /predict, so no URL maps to a file.
"""
from __future__ import annotations

import email.parser
import email.policy
import json
import os
import socket
import sys
import traceback
import warnings
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from PIL import Image

from flowerclf.base import cli
from flowerclf.base.errors import FlowerclfError
from flowerclf.serving.page import render
from flowerclf.serving.predictor import Predictor

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
READ_CHUNK = 1 << 20
CLIENT_TIMEOUT_S = 60  # a client silent this long mid-request is dropped, so it cannot hold a thread forever


class RequestError(FlowerclfError):
    """A request the server answers with an HTTP error status and a one-line JSON message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class App:
    """What every request needs: the model, how many names to return, and the upload limit."""

    predictor: Predictor
    model_path: str
    top_k: int
    names: dict[str, str]
    max_bytes: int

    def page(self) -> bytes:
        return render(self.model_path, len(self.predictor.classes), self.top_k, self.max_bytes)

    def predict(self, uploads: list[tuple[str, bytes]]) -> list[dict]:
        """predict.py --json's list for the uploaded files; RequestError 422 naming each unreadable one."""
        results, errors = self.predictor.predict_bytes(uploads, self.top_k, self.names)
        if errors:
            raise RequestError(422, "; ".join(errors))
        return results


def parse_uploads(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """The files of a multipart/form-data body as (file name without folders, content), in upload order."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise RequestError(415, "send the photos as multipart/form-data, as a form with <input type=file> does "
                                "(curl -F file=@photo.jpg URL/predict)")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart() or message.defects:
        raise RequestError(400, "the upload is not well-formed multipart/form-data "
                                f"({', '.join(type(d).__name__ for d in message.defects) or 'no parts'})")
    uploads = []
    for part in message.iter_parts():
        name = part.get_filename()  # None for a plain form field
        data = part.get_payload(decode=True) or b""
        if name is not None and (name or data):  # an empty file input sends filename="" and nothing
            uploads.append((os.path.basename(name.replace("\\", "/")) or "upload", data))
    if not uploads:
        raise RequestError(400, "the upload holds no file; send one or more (curl -F file=@photo.jpg URL/predict)")
    return uploads


class Handler(BaseHTTPRequestHandler):
    """GET / is the page, POST /predict the API; every other request gets a JSON error."""

    server_version = "flowerclf"
    timeout = CLIENT_TIMEOUT_S

    def log_message(self, format: str, *args) -> None:
        sys.stderr.write(cli.printable(f"{self.address_string()} - {format % args}") + "\n")

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Type": content_type, "Content-Length": str(len(body)),
                           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store", **(extra or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj, indent=2).encode("utf-8"), "application/json")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, an unknown method) answer in JSON too."""
        self.close_connection = True
        self._json(code, {"error": message or HTTPStatus(code).phrase})

    def do_GET(self) -> None:
        if urlsplit(self.path).path != "/":
            return self._json(404, {"error": "not found: this server has the page at / and POST /predict only"})
        self._send(200, self.server.app.page(), "text/html; charset=utf-8", {
            # the page loads nothing from anywhere; it only talks to this server
            "Content-Security-Policy": "default-src 'none'; img-src blob:; style-src 'unsafe-inline'; "
                                       "script-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; "
                                       "form-action 'none'; frame-ancestors 'none'"})

    def do_POST(self) -> None:
        try:
            if urlsplit(self.path).path != "/predict":
                raise RequestError(404, "not found: POST photos to /predict")
            self._json(200, self.server.app.predict(parse_uploads(self.headers.get("Content-Type", ""),
                                                                  self._read_body())))
        except RequestError as e:
            self._json(e.status, {"error": str(e)})
        except (ConnectionError, socket.timeout):
            self.close_connection = True  # the client went away or went silent: nobody to answer
        except Exception as e:  # a bug must not stop the server: answer 500 and keep serving
            traceback.print_exc()
            self._json(500, {"error": f"internal error: {type(e).__name__}: {e}"})

    def _read_body(self) -> bytes:
        """The request body, at most the upload limit; a larger one is read and dropped, then refused."""
        limit = self.server.app.max_bytes
        try:
            length = int(self.headers["Content-Length"])
        except TypeError:
            raise RequestError(411, "the request needs a Content-Length header") from None
        except ValueError:
            length = -1
        if length < 0:
            raise RequestError(400, f"Content-Length {self.headers['Content-Length']!r} is not a byte count")
        if length > limit:
            left = length
            while left > 0:  # drain, so the client gets the answer instead of a reset connection
                chunk = self.rfile.read(min(left, READ_CHUNK))
                if not chunk:
                    break
                left -= len(chunk)
            self.close_connection = True
            raise RequestError(413, f"upload of {length / 2 ** 20:.1f} MB is over the limit of "
                                    f"{limit / 2 ** 20:g} MB (serve.py --max_upload_mb)")
        body = self.rfile.read(length)
        if len(body) < length:
            raise ConnectionError("the client closed the connection mid-upload")
        return body


class Server(ThreadingHTTPServer):
    """One daemon thread per request (Ctrl-C never waits for a client); IPv6 for an IPv6 host."""

    request_queue_size = 128  # the listen backlog: socketserver's 5 resets a burst of concurrent clients

    def __init__(self, host: str, port: int, app: App):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.app = app
        super().__init__((host, port), Handler)


def serve(app: App, host: str, port: int) -> None:
    """Listen on host:port and answer until Ctrl-C; warn when the host is reachable from other machines."""
    # a photo over Pillow's pixel limit is refused outright, not decoded with a warning
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    try:
        server = Server(host, port, app)
    except OSError as e:
        raise FlowerclfError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port") from None
    bound = server.server_address[1]
    if host not in LOCAL_HOSTS:
        print(f"warning: listening on {host}:{bound}, reachable from other machines: anyone who can connect can "
              f"upload photos to this model; --host 127.0.0.1 (the default) keeps it local", file=sys.stderr)
    url_host = f"[{host}]" if ":" in host else host
    print(cli.printable(f"serving {app.model_path} on http://{url_host}:{bound}/ (Ctrl-C stops)"), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
