"""Generated images served on 127.0.0.1: the demo's web part, the benchmarks' URL lists and the tests' web.
Nothing here reaches beyond the loopback interface."""

from __future__ import annotations

import io
import random
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "grey", "pink"]
SHAPES = ["circle", "square", "triangle", "stripe", "dot"]
MODES = [("RGB", "JPEG"), ("RGB", "PNG"), ("RGB", "WEBP"), ("L", "JPEG"), ("RGBA", "PNG"), ("CMYK", "JPEG"),
         ("P", "PNG"), ("RGBA", "WEBP")]
_RGB = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (240, 220, 40),
        "purple": (140, 40, 180), "orange": (250, 140, 20), "white": (250, 250, 250), "black": (10, 10, 10),
        "grey": (128, 128, 128), "pink": (250, 150, 200)}


def make_image(index: int, seed: int = 0, min_side: int = 48, max_side: int = 400) -> tuple[bytes, str, str]:
    """One deterministic picture: (encoded bytes, file extension, a caption that describes it)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed * 1_000_003 + index)
    w, h = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
    bg, fg = rng.sample(COLORS, 2)
    shape = rng.choice(SHAPES)
    img = Image.new("RGB", (w, h), _RGB[bg])
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 4)):
        x0, y0 = rng.randint(0, w - 8), rng.randint(0, h - 8)
        x1, y1 = rng.randint(x0 + 4, w), rng.randint(y0 + 4, h)
        if shape in ("circle", "dot"):
            draw.ellipse((x0, y0, x1, y1), fill=_RGB[fg])
        elif shape == "triangle":
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=_RGB[fg])
        else:
            draw.rectangle((x0, y0, x1, y1), fill=_RGB[fg])
    noise = Image.effect_noise((w, h), rng.randint(8, 40)).convert("RGB")
    img = Image.blend(img, noise, 0.15)
    mode, fmt = MODES[index % len(MODES)]
    img = img.convert(mode) if mode != "P" else img.convert("P", palette=Image.ADAPTIVE)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
    return buf.getvalue(), ext, f"a {fg} {shape} on a {bg} background"


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # img2dataset opens many connections at once; a short backlog drops them

    def handle_error(self, request, client_address):  # a client that gave up (timeout test) is expected
        pass


class _QuietServer6(_QuietServer):
    address_family = socket.AF_INET6


class ImageServer:
    """A threaded HTTP server on 127.0.0.1 (or another loopback `host`, such as ::1) serving `files` (path -> bytes)
    plus fault routes: /status/<code>, /slow/<seconds>/<path>, /redirect-loop, /empty, /redirect/<url>,
    and hostile ones, for stage 1's fetch: /trickle/<path> (one byte of the body every half second),
    /trickle-headers (the same, inside the headers), /endless (a body without a length that never
    ends), /huge/<bytes> (as long as its honest Content-Length says), /lying/<bytes> (chunked, whatever
    its Content-Length says). `hits` lists the paths asked for; `sent` the body bytes each hostile
    route wrote before the client hung up; `before[path]`, a function run once, when `path` is first
    asked for (a test that fills the disk at that moment)."""

    def __init__(self, files: dict[str, bytes], port: int = 0, host: str = "127.0.0.1"):
        self.files = files
        self.hits: list[str] = []
        self.sent: dict[str, int] = {}
        self.before: dict = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _stream(self, path: str, total: float, headers: dict, chunked: bool = False):
                """Write `total` zero bytes (inf: for ever) as fast as the client takes them."""
                self.send_response(200)
                for k, v in {"Content-Type": "image/jpeg", "Connection": "close", **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                block, sent = bytes(1 << 20), 0
                try:
                    while sent < total:
                        n = int(min(len(block), total - sent))
                        self.wfile.write(b"%x\r\n%s\r\n" % (n, block[:n]) if chunked else block[:n])
                        sent += n
                    if chunked:
                        self.wfile.write(b"0\r\n\r\n")
                finally:
                    server.sent[path] = sent
                    self.close_connection = True

            def _trickle(self, path: str, head: bytes, body: bytes):
                """Send `head` at once, then `body` one byte every half second."""
                self.wfile.write(head)
                sent = 0
                try:
                    for i in range(len(body)):
                        self.wfile.write(body[i:i + 1])
                        sent += 1
                        time.sleep(0.5)
                finally:
                    server.sent[path] = sent
                    self.close_connection = True

            def do_GET(self):
                path = self.path.lstrip("/")
                server.hits.append(path)
                hook = server.before.pop(path, None)
                if hook is not None:
                    hook()
                if path in server.files:  # a served file overrides a fault route (a server that recovered)
                    return self._send(200, server.files[path], {"Content-Type": "application/octet-stream"})
                parts = path.split("/")
                if parts[0] == "status":
                    return self._send(int(parts[1]), b"error")
                if parts[0] == "redirect-loop":
                    return self._send(302, headers={"Location": "/redirect-loop"})
                if parts[0] == "redirect":
                    return self._send(302, headers={"Location": path[len("redirect/"):]})
                if parts[0] == "empty":
                    return self._send(200, b"", {"Content-Type": "image/jpeg"})
                if parts[0] == "endless":
                    return self._stream(path, float("inf"), {})
                if parts[0] == "huge":
                    return self._stream(path, int(parts[1]), {"Content-Length": parts[1]})
                if parts[0] == "lying":
                    return self._stream(path, int(parts[1]), {"Content-Length": "1000", "Transfer-Encoding": "chunked"},
                                        chunked=True)
                if parts[0] == "trickle-headers":
                    return self._trickle(path, b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"a" * 100_000)
                if parts[0] == "trickle":
                    body = server.files.get("/".join(parts[1:]), b"")
                    head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(body)
                    return self._trickle(path, head, body)
                if parts[0] == "slow":
                    time.sleep(float(parts[1]))
                    parts = parts[2:]
                body = server.files.get("/".join(parts))
                if body is None:
                    return self._send(404, b"not found")
                return self._send(200, body, {"Content-Type": "application/octet-stream"})

        self.httpd = (_QuietServer6 if ":" in host else _QuietServer)((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self.base = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)

    def __enter__(self) -> "ImageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def generate(n: int, seed: int = 0, **kw) -> tuple[dict[str, bytes], list[tuple[str, str]]]:
    """n images as served files plus (relative path, caption) rows."""
    files, rows = {}, []
    for i in range(n):
        data, ext, caption = make_image(i, seed, **kw)
        path = f"img/{i:06d}.{ext}"
        files[path] = data
        rows.append((path, caption))
    return files, rows


def write_url_list(path, base: str, rows: list[tuple[str, str]]) -> None:
    """A parquet URL list with `url` and `caption` columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": [f"{base}/{p}" if "://" not in p else p for p, _ in rows],
                             "caption": [c for _, c in rows]}), path)


@contextmanager
def serve_generated(n: int, seed: int = 0, port: int = 0):
    """Generate n images and serve them; yields (server, rows)."""
    files, rows = generate(n, seed)
    with ImageServer(files, port) as server:
        yield server, rows
