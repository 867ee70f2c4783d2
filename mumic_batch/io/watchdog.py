"""Hard per-object deadline for sockets: shut a socket down when its deadline passes.

Socket timeouts bound each recv() only. A server that drips one byte per second keeps every
recv() short while a header line or a chunk-size line takes hours, because http.client reads
those with readline(). One watchdog thread per Fetcher closes that gap: when a registered
socket's deadline passes it calls shutdown(), which makes any blocked recv() return at once.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import socket
import threading
import time

log = logging.getLogger(__name__)


class Watch:
    """A registration; `fired` tells the reader that its socket was shut down for the deadline."""

    __slots__ = ("sock", "end", "fired", "done")

    def __init__(self, sock: socket.socket, end: float) -> None:
        self.sock: socket.socket | None = sock
        self.end = end
        self.fired = False
        self.done = False


class Watchdog:
    """One daemon thread that enforces the deadlines of all registered sockets."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Watch]] = []
        self._counter = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, sock: socket.socket, end: float) -> Watch:
        """Shut `sock` down at monotonic time `end` unless `release` is called first."""
        item = Watch(sock, end)
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="fetch-watchdog", daemon=True)
                self._thread.start()
            # The thread sleeps until the earliest end in the heap, so it needs waking only for
            # an earlier one; with one deadline_s for all, that is rare, which saves a thread
            # switch per request (a per-image cost at thousands of images/s).
            wake = not self._heap or end < self._heap[0][0]
            heapq.heappush(self._heap, (end, next(self._counter), item))
            if wake:
                self._cond.notify()
        return item

    def release(self, item: Watch) -> None:
        """The read finished; the socket is left alone (its entry is dropped lazily)."""
        with self._cond:
            item.done = True
            item.sock = None  # the entry may wait in the heap until its end: do not keep the socket

    def close(self) -> None:
        """Stop the thread (registered sockets are no longer watched)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(timeout=wait)
                    continue
                _, _, item = heapq.heappop(self._heap)
                item.fired = True
                if item.sock is not None:
                    _shutdown(item.sock)


def _shutdown(sock: socket.socket) -> None:
    # The plain socket-level shutdown, also for SSLSocket: its own shutdown() drops the SSL
    # object under the feet of the thread that is reading.
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError as err:  # already closed by its reader: nothing left to stop
        log.debug("watchdog shutdown: %s", err)
