"""http(s) reader: SSRF-checked, pinned to the checked address, capped, with bounded retries.

Each request resolves the host, checks every address (addresses.resolve_destination) and then
uses a connection to that very address, with Host and SNI set to the name, so DNS rebinding
cannot move it. Kept-alive connections are pooled under (scheme, host, port, checked address):
a request only ever reuses a connection that was opened for the destination it has just
checked, so a redirect to another host, or a DNS answer that changed, gets a connection of its
own (or is refused before one is opened). Redirects are followed by hand and every hop is
checked again.
"""

from __future__ import annotations

import http.client
import logging
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin

from mumic_batch.config import FetchCfg
from mumic_batch.core.status import (
    BLOCKED_SCHEME,
    FETCH_ERROR,
    TIMEOUT,
    TOO_LARGE,
    TOO_MANY_REDIRECTS,
    TRANSIENT_HTTP,
    ImageError,
    http_status,
)
from mumic_batch.io.addresses import IPAddress, IPNetwork, Resolver, resolve_destination, system_resolver
from mumic_batch.io.fetch_base import Deadline, FetchError, backoff_delay, parse_retry_after
from mumic_batch.io.uris import ParsedUri, parse_uri
from mumic_batch.io.watchdog import Watch, Watchdog

log = logging.getLogger(__name__)

REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024


class _Retryable(Exception):
    """A failure worth another attempt (throttling, 5xx, reset, per-attempt timeout)."""

    def __init__(self, status: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class _StaleConnection(Exception):
    """A pooled connection that the server had closed: the request is sent again on a new one."""


@dataclass
class _Redirect:
    location: str


_Key = tuple[str, str, int, IPAddress]  # scheme, host name, port, the checked address it is pinned to


def open_socket(ip: IPAddress, port: int, timeout: float) -> socket.socket:
    """TCP connection to the checked address (tests wrap this to prove nothing else is dialled)."""
    return socket.create_connection((str(ip), port), timeout=timeout)


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to a fixed address; Host header and SNI carry the name."""

    def __init__(self, url: ParsedUri, ip: IPAddress, context: ssl.SSLContext | None,
                 timeouts: tuple[float, float]) -> None:
        super().__init__(url.host, url.port)
        self.default_port = 443 if url.scheme == "https" else 80  # Host header omits a default port
        self._ip = ip
        self._context = context
        self._connect_timeout, self._read_timeout = timeouts
        self.pinned: socket.socket | None = None
        self.idle_since = 0.0

    def connect(self) -> None:
        sock = open_socket(self._ip, self.port, self._connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self._read_timeout)
        if self._context is not None:
            sock = self._context.wrap_socket(sock, server_hostname=self.host, do_handshake_on_connect=False)
        self.sock = self.pinned = sock

    def handshake(self) -> None:
        """TLS handshake, run after the socket is under the watchdog."""
        if isinstance(self.pinned, ssl.SSLSocket):
            self.pinned.do_handshake()

    def dropped(self) -> bool:
        """True when an idle connection can no longer carry a request (closed by the server)."""
        if self.sock is None:
            return True
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True  # bytes nobody asked for: the connection is out of step
        # Readable while idle means EOF, a reset or stray bytes: none leaves it usable.
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))


class ConnectionPool:
    """Idle kept-alive connections of one Fetcher, newest last; thread-safe.

    Bounded over all hosts together (`fetch.pool_connections`): putting one more back closes the
    oldest. Connections idle for longer than `fetch.pool_idle_s` are closed when the pool is next
    used. Each connection is in use by one thread at a time: `take` removes it from the pool.
    The TLS settings are one SSL context per reader, so the key need not name them.
    """

    def __init__(self, size: int, idle_s: float) -> None:
        self.size = size
        self._idle_s = idle_s
        self._lock = threading.Lock()
        self._idle: list[tuple[_Key, _PinnedConnection]] = []
        self._closed = False

    def take(self, key: _Key) -> _PinnedConnection | None:
        """The most recently used idle connection for `key` that is still open, or None."""
        while True:
            with self._lock:
                stale = self._expire()
                conn = None
                for i in range(len(self._idle) - 1, -1, -1):
                    if self._idle[i][0] == key:
                        conn = self._idle.pop(i)[1]
                        break
            _close_all(stale)
            if conn is None or not conn.dropped():
                return conn
            conn.close()

    def put(self, key: _Key, conn: _PinnedConnection) -> None:
        """Keep `conn` for the next request to `key` (or close it when the pool is full or closed)."""
        conn.idle_since = time.monotonic()
        with self._lock:
            if self._closed or self.size == 0:
                stale = [conn]
            else:
                self._idle.append((key, conn))
                stale = self._expire()
                excess = len(self._idle) - self.size
                if excess > 0:
                    stale += [c for _, c in self._idle[:excess]]
                    del self._idle[:excess]
        _close_all(stale)

    def close(self) -> None:
        """Close every idle connection; later `put`s close theirs at once."""
        with self._lock:
            self._closed = True
            stale = [c for _, c in self._idle]
            self._idle.clear()
        _close_all(stale)

    def _expire(self) -> list[_PinnedConnection]:
        # The list is in put order, so the expired ones are a prefix.
        limit = time.monotonic() - self._idle_s
        n = 0
        while n < len(self._idle) and self._idle[n][1].idle_since < limit:
            n += 1
        expired = [c for _, c in self._idle[:n]]
        del self._idle[:n]
        return expired


def _close_all(conns: list[_PinnedConnection]) -> None:
    for conn in conns:
        conn.close()


class HttpReader:
    """Reads http(s) URLs under FetchCfg's limits; thread-safe (the only shared state is the locked pool)."""

    def __init__(self, cfg: FetchCfg, networks: tuple[IPNetwork, ...], watchdog: Watchdog,
                 resolver: Resolver | None = None) -> None:
        self._cfg = cfg
        self._networks = networks
        self._watchdog = watchdog
        self._resolver = resolver or system_resolver
        self._context = ssl.create_default_context(cafile=cfg.ca_bundle or None)
        self._pool = ConnectionPool(cfg.pool_connections, cfg.pool_idle_s)

    def close(self) -> None:
        """Close the idle pooled connections."""
        self._pool.close()

    def read(self, url: ParsedUri, deadline: Deadline) -> tuple[bytes, int]:
        """Body bytes and the number of requests made; raises FetchError."""
        attempts = [0]
        for _ in range(self._cfg.max_redirects + 1):
            outcome = self._with_retries(url, deadline, attempts)
            if isinstance(outcome, bytes):
                return outcome, attempts[0]
            url = self._next_hop(url, outcome.location, attempts[0])
        raise FetchError(TOO_MANY_REDIRECTS, f"more than {self._cfg.max_redirects} redirects", attempts[0])

    def _next_hop(self, url: ParsedUri, location: str, attempts: int) -> ParsedUri:
        target = urljoin(url.raw, location)
        try:
            nxt = parse_uri(target)
        except ImageError as err:
            raise FetchError(err.status, f"redirect to {target!r}: {err.message}", attempts) from err
        # A redirect may only lead to another web URL: never to file://, s3:// or gopher://.
        if nxt.scheme not in ("http", "https") or nxt.scheme not in self._cfg.allowed_schemes:
            raise FetchError(BLOCKED_SCHEME, f"redirect to scheme {nxt.scheme!r} refused", attempts)
        log.debug("redirect %s -> %s", url.raw, nxt.raw)
        return nxt

    def _with_retries(self, url: ParsedUri, deadline: Deadline, attempts: list[int]) -> bytes | _Redirect:
        while True:
            try:
                return self._request(url, deadline, attempts)
            except ImageError as err:
                raise FetchError(err.status, err.message, attempts[0]) from err
            except _Retryable as err:
                delay = self._retry_delay(err, deadline, attempts[0])
                log.debug("retry %s in %.2fs after %s: %s", url.raw, delay, err.status, err.message)
                time.sleep(delay)

    def _retry_delay(self, err: _Retryable, deadline: Deadline, attempt: int) -> float:
        if attempt >= self._cfg.max_attempts:
            raise FetchError(err.status, f"{err.message} (after {attempt} attempts)", attempt)
        delay = max(backoff_delay(self._cfg.backoff_s, attempt), err.retry_after or 0.0)
        # Waiting past the deadline only to time out would waste the thread: give up now.
        if delay >= deadline.remaining():
            raise FetchError(err.status, f"{err.message} (no time left to retry)", attempt)
        return delay

    def _request(self, url: ParsedUri, deadline: Deadline, attempts: list[int]) -> bytes | _Redirect:
        ip = resolve_destination(url.host, url.port, self._cfg.allowed_hosts, self._networks, self._resolver)
        attempts[0] += 1  # counts requests actually tried, not those refused by the checks
        key: _Key = (url.scheme, url.host, url.port, ip)
        pooled = self._pool.take(key)
        if pooled is not None:
            try:
                return self._exchange(pooled, key, url, deadline, fresh=False)
            except _StaleConnection as err:
                # The server closed it while it sat idle; the request never reached the
                # application, so it is sent again on a new connection as the same attempt.
                log.debug("pooled connection to %s was closed (%s); reconnecting", url.host, err.__cause__)
        context = self._context if url.scheme == "https" else None
        timeouts = (deadline.cap(self._cfg.connect_timeout_s), deadline.cap(self._cfg.read_timeout_s))
        return self._exchange(_PinnedConnection(url, ip, context, timeouts), key, url, deadline, fresh=True)

    def _exchange(self, conn: _PinnedConnection, key: _Key, url: ParsedUri, deadline: Deadline,
                  fresh: bool) -> bytes | _Redirect:
        """One request on `conn` (a new one when `fresh`); returns it to the pool when reusable."""
        watch: Watch | None = None
        reusable = False
        try:
            if fresh:
                conn.connect()
            assert conn.pinned is not None
            conn.pinned.settimeout(deadline.cap(self._cfg.read_timeout_s))
            watch = self._watchdog.watch(conn.pinned, deadline.end)
            if fresh:
                conn.handshake()
            resp = self._send(conn, url, fresh, watch)
            outcome = self._receive(conn, resp, url, deadline, watch)
            reusable = isinstance(outcome, bytes) and not resp.will_close
            return outcome
        except (ImageError, _Retryable, _StaleConnection):
            raise
        except Exception as err:  # noqa: BLE001 - socket, ssl and http.client raise many types
            raise _classify(err, watch, deadline) from err
        finally:
            if watch is not None:
                self._watchdog.release(watch)
            # After release the watchdog can no longer fire, so `fired` is final here.
            if reusable and watch is not None and not watch.fired:
                self._pool.put(key, conn)
            else:
                conn.close()

    def _send(self, conn: _PinnedConnection, url: ParsedUri, fresh: bool, watch: Watch) -> http.client.HTTPResponse:
        """Send the GET and read the status line and headers."""
        try:
            conn.putrequest("GET", url.path, skip_accept_encoding=True)
            # identity: a compressed body would dodge the byte cap, which counts wire bytes.
            conn.putheader("Accept-Encoding", "identity")
            conn.putheader("Accept", "image/*, */*;q=0.5")
            conn.putheader("User-Agent", self._cfg.user_agent)
            if self._pool.size == 0:
                conn.putheader("Connection", "close")
            conn.endheaders()
            return conn.getresponse()
        except (ConnectionError, ssl.SSLEOFError) as err:
            if fresh or watch.fired:
                raise
            raise _StaleConnection(str(err)) from err

    def _receive(self, conn: _PinnedConnection, resp: http.client.HTTPResponse, url: ParsedUri,
                 deadline: Deadline, watch: Watch) -> bytes | _Redirect:
        code = resp.status
        log.debug("GET %s -> %d", url.raw, code)
        if code in REDIRECT_STATUS and resp.getheader("Location"):
            return _Redirect(str(resp.getheader("Location")))
        if code in TRANSIENT_HTTP:
            raise _Retryable(http_status(code), f"http {code}", parse_retry_after(resp.getheader("Retry-After")))
        if not 200 <= code < 300:
            raise FetchError(http_status(code), f"http {code} {resp.reason}")
        encoding = (resp.getheader("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            raise FetchError(FETCH_ERROR, f"Content-Encoding {encoding!r} refused (identity was requested)")
        if resp.length is not None and resp.length > self._cfg.max_bytes:
            raise FetchError(TOO_LARGE, f"Content-Length {resp.length} > max_bytes {self._cfg.max_bytes}")
        return self._read_body(conn, resp, deadline, watch)

    def _read_body(self, conn: _PinnedConnection, resp: http.client.HTTPResponse, deadline: Deadline,
                   watch: Watch) -> bytes:
        body = bytearray()
        assert conn.pinned is not None
        while True:
            conn.pinned.settimeout(deadline.cap(self._cfg.read_timeout_s))
            # read1: at most one socket read, so the deadline is checked between small reads.
            chunk = resp.read1(_CHUNK)
            if watch.fired:
                raise FetchError(TIMEOUT, f"deadline of {deadline.seconds:g}s exceeded while reading")
            if not chunk:
                if resp.length:  # read1 reports a body cut short only as end of data
                    raise http.client.IncompleteRead(bytes(body), resp.length)
                # read1 leaves a body that ended at its Content-Length open, and http.client
                # sends nothing more on the connection until the response is closed.
                resp.close()
                return bytes(body)
            body += chunk
            if len(body) > self._cfg.max_bytes:
                # Stops lying lengths, close-delimited and endless chunked bodies alike.
                raise FetchError(TOO_LARGE, f"body exceeds max_bytes {self._cfg.max_bytes}")


def _classify(err: Exception, watch: Watch | None, deadline: Deadline) -> Exception:
    """Map a low-level failure to a final FetchError or a _Retryable."""
    name = f"{type(err).__name__}: {err}"
    if (watch is not None and watch.fired) or deadline.remaining() <= 0:
        return FetchError(TIMEOUT, f"deadline of {deadline.seconds:g}s exceeded ({name})")
    if isinstance(err, TimeoutError):
        return _Retryable(TIMEOUT, name)
    if isinstance(err, ssl.SSLError):  # certificate or protocol trouble: retrying will not help
        return FetchError(FETCH_ERROR, f"tls: {name}")
    if isinstance(err, (ConnectionError, http.client.IncompleteRead)):
        return _Retryable(FETCH_ERROR, name)
    if isinstance(err, http.client.HTTPException):  # malformed response: not a transient fault
        return FetchError(FETCH_ERROR, name)
    if isinstance(err, OSError):  # unreachable network, reset, ...
        return _Retryable(FETCH_ERROR, name)
    return FetchError(FETCH_ERROR, name)
