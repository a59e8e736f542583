"""Stage 1's fetch: one GET per try with redirects and the X-Robots-Tag check, as img2dataset's
`download_image` does, but bounded for a URL list nobody vetted:

- a wall-clock deadline per try over connect, headers and body (img2dataset's `timeout` is a
  per-read socket timeout, which every byte of a trickling server starts again): a watchdog thread
  shuts the try's sockets down when it passes, whatever call they are blocked in;
- a byte cap: a Content-Length over it is refused before the body is read, and the body is cut at
  the cap when the length lies or is absent;
- public addresses only, unless allowed: the addresses a host resolves to are checked, and only a
  checked one is connected to, on every redirect hop, so neither the list nor a DNS answer that
  changes after the check reaches loopback, private, link-local (cloud metadata), multicast or
  reserved addresses.

pipeline.downloader's `GuardedDownloader` fetches each row of a shard with `fetch_with_retries`.
"""

from __future__ import annotations

import heapq
import http.client
import io
import ipaddress
import itertools
import os
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from img2dataset.downloader import is_disallowed

from siclip.pipeline.config import ALLOW_PRIVATE_FLAG
from siclip.pipeline.urls import browser_url

# img2dataset's browser-like User-Agent: some hosts refuse Python's own
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
CHUNK = 64 * 1024
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A globally routable unicast address; an IPv6 address that carries an IPv4 one (mapped, 6to4,
    NAT64) is judged by the IPv4 address it reaches."""
    if ip.version == 6:
        if ip.ipv4_mapped or ip.sixtofour:
            ip = ip.ipv4_mapped or ip.sixtofour
        elif ip in NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_private or ip.is_loopback
                                 or ip.is_link_local or ip.is_unspecified)


@dataclass(frozen=True)
class FetchPolicy:
    """What a try may fetch besides its deadline: at most `max_bytes`, from which addresses."""

    max_bytes: int
    allow_private: bool = False
    allow_networks: tuple = ()  # ipaddress networks fetched even when private addresses are refused

    def permits(self, ip) -> bool:
        return self.allow_private or is_public(ip) or any(ip in net for net in self.allow_networks)


class FetchRefused(Exception):
    """A try the policy stopped; its message becomes the row's error (see pipeline.reasons)."""


# --- deadlines -------------------------------------------------------------------------------

class _Try:
    """One download try: when it must end, and the sockets to cut if it has not."""

    def __init__(self, deadline_s: float):
        self.ends = time.monotonic() + deadline_s
        self.cut = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._over = False

    def remaining(self) -> float:
        """Seconds left; TimeoutError once the deadline has passed or the watchdog cut the try."""
        left = self.ends - time.monotonic()
        if left <= 0 or self.cut:
            raise TimeoutError("deadline passed")
        return left

    def watch(self, sock: socket.socket) -> None:
        """Cut `sock` at the deadline. A duplicate is kept: TLS takes the socket object over, and
        shutting down a duplicate ends the connection for both."""
        dup = sock.dup()
        with self._lock:
            if not self.cut:
                self._socks.append(dup)
                return
        dup.close()
        raise TimeoutError("deadline passed")

    def cut_now(self) -> None:
        with self._lock:
            if self._over:
                return
            self.cut = True
            for s in self._socks:
                try:  # wakes a blocked handshake or read (a connect has the time left as its socket timeout)
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def finish(self) -> None:
        with self._lock:
            self._over = True
            socks, self._socks = self._socks, []
        for s in socks:
            s.close()


class _Watchdog:
    """One thread per process that cuts the tries still running at their deadline."""

    def __init__(self):
        self._heap: list = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="siclip-fetch-deadlines", daemon=True).start()

    def add(self, t: _Try) -> None:
        with self._cond:
            heapq.heappush(self._heap, (t.ends, next(self._order), t))
            if self._heap[0][2] is t:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                t = heapq.heappop(self._heap)[2]
            t.cut_now()  # a finished try ignores it


class _ProcessState:
    """The watchdog and the resolver threads of this process (threads do not survive a fork)."""

    _lock = threading.Lock()
    _current: "_ProcessState | None" = None

    def __init__(self):
        self.pid = os.getpid()
        self.watchdog = _Watchdog()
        # getaddrinfo cannot be interrupted: it runs here, and a try stops waiting for it at its deadline
        self.resolver = ThreadPoolExecutor(max_workers=16, thread_name_prefix="siclip-resolve")

    @classmethod
    def here(cls) -> "_ProcessState":
        with cls._lock:
            if cls._current is None or cls._current.pid != os.getpid():
                cls._current = cls()
            return cls._current


# --- connecting only where the policy permits --------------------------------------------------

_local = threading.local()  # the try and policy of the fetch running on this thread


def _resolve(host: str, port: int, t: _Try) -> list:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:  # a name, not an address literal
        pass
    future = _ProcessState.here().resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        return future.result(timeout=t.remaining())
    except FutureTimeout:
        raise TimeoutError(f"timed out resolving {host}") from None


def _connect(address, timeout=None, source_address=None) -> socket.socket:
    """socket.create_connection for http.client: the policy checks each address before it is
    connected to (the one used, not a name resolved again later), and the try watches the socket."""
    t, policy = _local.try_, _local.policy
    host, port = address
    refused, error = None, None
    for family, type_, proto, _, sockaddr in _resolve(host, port, t):
        ip = ipaddress.ip_address(sockaddr[0])
        if not policy.permits(ip):
            refused = ip
            continue
        sock = socket.socket(family, type_, proto)
        try:
            t.watch(sock)
            sock.settimeout(t.remaining())
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            error = e
    if error is not None:
        raise error
    raise FetchRefused(f"private address {refused} (host {host}) refused: pass {ALLOW_PRIVATE_FLAG} to fetch from "
                       "your own network")


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _connect


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _connect  # TLS is then set up on the checked connection


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_HTTPSConnection, req, context=self._context)


class _Unread:
    """A redirect's body, closed without reading it: urllib reads all of it, and it need not end."""

    def __init__(self, fp):
        self._fp = fp

    def read(self, *args) -> bytes:
        return b""

    def close(self) -> None:
        self._fp.close()


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    def http_error_302(self, req, fp, code, msg, headers):
        return super().http_error_302(req, _Unread(fp), code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _build_opener() -> urllib.request.OpenerDirector:
    """http and https only (a redirect to file:, ftp: or data: goes nowhere), and no proxy from the
    environment: the address checked must be the one connected to."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.UnknownHandler(), _HTTPHandler(), _HTTPSHandler(), _RedirectHandler(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


_OPENER = _build_opener()


# --- the fetch ---------------------------------------------------------------------------------

def _declared_length(headers) -> int | None:
    try:
        n = int(headers.get("Content-Length", ""))
    except ValueError:
        return None
    return n if n >= 0 else None


def _read_body(r, t: _Try, cap: int) -> io.BytesIO:
    declared = _declared_length(r.headers)
    if declared is not None and declared > cap:
        raise FetchRefused(f"too large: Content-Length {declared:,} bytes, over max_download_size ({cap:,} bytes)")
    body = io.BytesIO()
    while chunk := r.read(CHUNK):
        body.write(chunk)
        if body.tell() > cap:
            said = f" (its Content-Length said {declared:,})" if declared is not None else ""
            raise FetchRefused(f"too large: the body passed max_download_size ({cap:,} bytes){said}")
        t.remaining()  # a fast endless body never blocks long enough for the watchdog to matter
    t.remaining()  # a cut socket reads as the end of a body without a length
    if not r.chunked and r.length:  # http.client ends a short body quietly when read in parts
        raise ConnectionError(f"IncompleteRead({body.tell()} bytes read, {r.length} more expected)")
    return body


def fetch(url: str, deadline_s: float, policy: FetchPolicy, user_agent_token: str | None = None,
          disallowed_header_directives=None) -> tuple[io.BytesIO | None, str | None]:
    """One try: (the body, None), or (None, why it failed) once `deadline_s` has passed, the body
    is over the cap, an address is refused, or the server or the network fails."""
    try:
        target = browser_url(url)  # spaces and non-ASCII characters percent-encoded, as a browser does
    except ValueError as e:  # refused up front by pipeline.urls; a list read otherwise still gets a reason
        return None, f"malformed url: {e}"
    t = _Try(deadline_s)
    _ProcessState.here().watchdog.add(t)
    _local.try_, _local.policy = t, policy
    agent = USER_AGENT + (f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
                          if user_agent_token else "")
    try:
        request = urllib.request.Request(target, headers={"User-Agent": agent})
        with _OPENER.open(request, timeout=t.remaining()) as r:
            if disallowed_header_directives and is_disallowed(r.headers, user_agent_token,
                                                              disallowed_header_directives):
                return None, "Use of image disallowed by X-Robots-Tag directive"
            return _read_body(r, t, policy.max_bytes), None
    except FetchRefused as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - any failure is the row's, as in img2dataset
        if t.cut or time.monotonic() >= t.ends:
            return None, f"timed out: no whole answer within the {deadline_s:g} s deadline (timeout)"
        return None, str(e)
    finally:
        t.finish()
        _local.try_ = _local.policy = None


_NOT_RETRIED = ("too large", "private address", "malformed url")  # the same answer every time


def fetch_with_retries(url: str, deadline_s: float, retries: int, policy: FetchPolicy, user_agent_token: str | None = None,
                       disallowed_header_directives=None) -> tuple[io.BytesIO | None, str | None]:
    """`fetch`, tried up to `retries` more times while it fails for a reason that may change."""
    for _ in range(retries + 1):
        body, error = fetch(url, deadline_s, policy, user_agent_token, disallowed_header_directives)
        if body is not None or error.startswith(_NOT_RETRIED):
            break
    return body, error
