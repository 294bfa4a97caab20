"""The local prediction server: its routes, upload parsing and JSON answers, on http.server's ThreadingHTTPServer.

Torch-free with a model.onnx. Uploads are parsed in memory (the `email` package's MIME parser) and
never written to disk; the only things served are the page and POST /predict, so no URL maps to a file.
"""
from __future__ import annotations

import email.message
import email.parser
import email.policy
import ipaddress
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
MAX_FILES = 64  # files in one POST /predict: serve.py --max_files
READ_CHUNK = 1 << 20
CLIENT_TIMEOUT_S = 60  # a client silent this long mid-request is dropped, so it cannot hold a thread forever


class RequestError(FlowerclfError):
    """A request the server answers with an HTTP error status and a one-line JSON message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class App:
    """What every request needs: the model, how many names to return, and the upload limits."""

    predictor: Predictor
    model_path: str
    top_k: int
    names: dict[str, str]
    max_bytes: int
    max_files: int = MAX_FILES

    def page(self) -> bytes:
        return render(self.model_path, len(self.predictor.classes), self.top_k, self.max_bytes)

    def predict(self, uploads: list[tuple[str, bytes]]) -> list[dict]:
        """predict.py --json's list for the uploaded files; RequestError 422 naming each unreadable one."""
        results, errors = self.predictor.predict_bytes(uploads, self.top_k, self.names)
        if errors:
            raise RequestError(422, "; ".join(errors))
        return results


def check_content_type(content_type: str) -> None:
    """RequestError 415 unless the request is multipart/form-data."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise RequestError(415, "send the photos as multipart/form-data, as a form with <input type=file> does "
                                "(curl -F file=@photo.jpg URL/predict)")


def check_part_count(parts: int, max_files: int) -> None:
    """RequestError 413 when an upload has more parts than one request may carry."""
    if parts > max_files:
        raise RequestError(413, f"the upload has {parts} parts; one request takes at most {max_files} files "
                                f"(serve.py --max_files): send the rest in further requests")


def parse_uploads(content_type: str, body: bytes, max_files: int = MAX_FILES) -> list[tuple[str, bytes]]:
    """The files of a multipart/form-data body as (file name without folders, content), in upload order.

    More than `max_files` parts are refused before the body is parsed: counted by their delimiter lines.
    """
    check_content_type(content_type)
    header = email.message.Message()
    header["Content-Type"] = content_type
    boundary = header.get_boundary()
    if boundary:  # a delimiter line before each part, and a closing one (a body without it is refused below)
        check_part_count(body.count(b"--" + boundary.encode("latin-1", "replace")) - 1, max_files)
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


def host_name(host: str) -> str:
    """The name in a Host header or an address, lower case, without its port or an IPv6 address's brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the server on this machine (127.0.0.1, ::1, localhost)."""
    if host_name(host) == "localhost":
        return True
    try:
        return ipaddress.ip_address(host_name(host)).is_loopback
    except ValueError:
        return False


class Handler(BaseHTTPRequestHandler):
    """GET / is the page, POST /predict the API; every other request gets a one-line JSON error.

    HTTP/1.1, so that Expect: 100-continue is answered and connections are kept alive: every answer has a
    Content-Length, and an error (or a request whose body is left unread) closes the connection.
    """

    server_version = "flowerclf"
    protocol_version = "HTTP/1.1"
    timeout = CLIENT_TIMEOUT_S

    def log_message(self, format: str, *args) -> None:
        sys.stderr.write(cli.printable(f"{self.address_string()} - {format % args}") + "\n")

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        if status >= 400 or (self.command != "POST" and self._has_body()):
            self.close_connection = True  # what is left of the request must not be read as the next one
        self.send_response(status)
        for key, value in {"Content-Type": content_type, "Content-Length": str(len(body)),
                           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store", **(extra or {}),
                           **({"Connection": "close"} if self.close_connection else {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        """An answer in JSON: an error on one line, predictions indented for people reading curl's output."""
        self._send(status, json.dumps(obj, indent=2 if status < 400 else None).encode("utf-8"), "application/json")

    def _has_body(self) -> bool:
        return self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers

    def _refuse(self, error: RequestError, drain: bool = False) -> None:
        """Answer `error`; `drain` first reads the body the client is sending, so it gets the answer, not a reset."""
        try:
            if drain:
                self._drain()
            self._json(error.status, {"error": str(error)})
        except (ConnectionError, socket.timeout):
            self.close_connection = True  # the client went away or went silent: nobody to answer

    def _drain(self) -> None:
        """Read and drop the request body of a refused POST (nothing where its length is unknown)."""
        try:
            left = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return
        while left > 0 and "Transfer-Encoding" not in self.headers:
            chunk = self.rfile.read(min(left, READ_CHUNK))
            if not chunk:
                break
            left -= len(chunk)

    def _check_headers(self) -> None:
        """What a request must pass on its headers alone, before its body is read or 100 Continue is sent."""
        server, host = self.server, self.headers.get("Host")
        if server.loopback and host is not None and host_name(host) not in server.local_names:
            # DNS rebinding: a page on evil.example.com whose name now resolves to 127.0.0.1
            raise RequestError(421, f"Host {host!r} is not this machine: listening on a loopback address, this "
                                    f"server answers only to 127.0.0.1, localhost and [::1]; open "
                                    f"http://{server.url_host}:{server.server_address[1]}/")
        if self.command != "POST":
            return
        if urlsplit(self.path).path != "/predict":
            raise RequestError(404, "not found: POST photos to /predict")
        origin = self.headers.get("Origin")
        if origin is not None and origin.strip().lower() != f"http://{(host or '').strip().lower()}":
            # a form or fetch() on another site posting here; the page itself sends its own origin
            raise RequestError(403, f"uploads from pages of other sites (Origin {origin!r}) are refused: "
                                    f"use the page this server shows at /, or send no Origin header")
        self._body_length()
        check_content_type(self.headers.get("Content-Type", ""))

    def handle_expect_100(self) -> bool:
        """Expect: 100-continue gets 100 Continue only when the headers pass; otherwise the error, and no body."""
        try:
            self._check_headers()
        except RequestError as e:
            self._refuse(e)
            return False
        return super().handle_expect_100()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, an unknown method) answer in JSON too."""
        if self.request_version == "HTTP/0.9" and len(getattr(self, "requestline", "").split()) != 2:
            self.request_version = "HTTP/1.0"  # a garbled request line gets a status line too, not a bare body
        self.close_connection = True
        self._json(code, {"error": message or HTTPStatus(code).phrase})

    def do_GET(self) -> None:
        try:
            self._check_headers()
        except RequestError as e:
            return self._refuse(e)
        if urlsplit(self.path).path != "/":
            return self._json(404, {"error": "not found: this server has the page at / and POST /predict only"})
        self._send(200, self.server.app.page(), "text/html; charset=utf-8", {
            # the page loads nothing from anywhere; it only talks to this server
            "Content-Security-Policy": "default-src 'none'; img-src blob:; style-src 'unsafe-inline'; "
                                       "script-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; "
                                       "form-action 'none'; frame-ancestors 'none'"})

    def do_POST(self) -> None:
        body = None
        try:
            self._check_headers()
            body = self._read_body()
            self._json(200, self.server.app.predict(parse_uploads(self.headers.get("Content-Type", ""), body,
                                                                  self.server.app.max_files)))
        except RequestError as e:
            self._refuse(e, drain=body is None)
        except (ConnectionError, socket.timeout):
            self.close_connection = True  # the client went away or went silent: nobody to answer
        except Exception as e:  # a bug must not stop the server: answer 500 and keep serving
            traceback.print_exc()
            self._json(500, {"error": f"internal error: {type(e).__name__}: {e}"})

    def _read_body(self) -> bytes:
        """The request body, at most the upload limit (a larger one is refused before it is read)."""
        length = self._body_length()
        body = self.rfile.read(length)
        if len(body) < length:
            raise ConnectionError("the client closed the connection mid-upload")
        return body

    def _body_length(self) -> int:
        """The Content-Length of the upload: 411 without one (or chunked), 400 if not a number, 413 over the limit."""
        limit = self.server.app.max_bytes
        if "Transfer-Encoding" in self.headers:
            raise RequestError(411, "send the upload with a Content-Length, not Transfer-Encoding: "
                                    f"{self.headers['Transfer-Encoding']}")
        try:
            length = int(self.headers["Content-Length"])
        except TypeError:
            raise RequestError(411, "the request needs a Content-Length header") from None
        except ValueError:
            length = -1
        if length < 0:
            raise RequestError(400, f"Content-Length {self.headers['Content-Length']!r} is not a byte count")
        if length > limit:
            raise RequestError(413, f"upload of {length / 2 ** 20:.1f} MB is over the limit of "
                                    f"{limit / 2 ** 20:g} MB (serve.py --max_upload_mb)")
        return length


class Server(ThreadingHTTPServer):
    """One daemon thread per request (Ctrl-C never waits for a client); IPv6 for an IPv6 host."""

    request_queue_size = 128  # the listen backlog: socketserver's 5 resets a burst of concurrent clients

    def __init__(self, host: str, port: int, app: App):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.app = app
        # bound to a loopback address, the only Host names answered are loopback ones (no DNS rebinding)
        self.loopback = is_loopback(host)
        self.local_names = {*LOCAL_HOSTS, host_name(host)}
        self.url_host = f"[{host}]" if ":" in host else host
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
