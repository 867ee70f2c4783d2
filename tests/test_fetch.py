"""Fetcher against real loopback servers: local files, HTTP (hostile routes, SSRF), HTTPS, S3 (moto).

An autouse guard wraps the one function that opens sockets: any destination outside 127/8 fails
the test, so a broken SSRF check can never reach a metadata service or the network from here.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from mumic_batch.config import DecodeCfg, FetchCfg
from mumic_batch.core import status
from mumic_batch.core.decode import decode_image
from mumic_batch.io import fetch_http
from mumic_batch.io.fetch import Fetcher, FetchError
from tests.fixtures.net import (Canary, HttpServer, S3Server, _Handler, _Server, free_port, make_jpeg,
                                make_tls_files, start_server)

LOOPBACK_NET = ipaddress.ip_network("127.0.0.0/8")
FAST = dict(connect_timeout_s=1.0, read_timeout_s=0.5, deadline_s=3.0, backoff_s=0.01, max_attempts=3,
            max_bytes=1_000_000, max_redirects=3)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every socket the fetcher opens must be on loopback; yields the addresses dialled."""
    real = fetch_http.open_socket
    dialled: list[str] = []
    strays: list[str] = []

    def guarded(ip: Any, port: int, timeout: float) -> Any:
        if ipaddress.ip_address(ip) not in LOOPBACK_NET:
            strays.append(str(ip))
            raise AssertionError(f"test tried to connect to {ip}")
        dialled.append(str(ip))
        return real(ip, port, timeout)

    monkeypatch.setattr(fetch_http, "open_socket", guarded)
    yield dialled
    assert strays == [], f"connections outside loopback were attempted: {strays}"


@pytest.fixture
def make_fetcher() -> Iterator[Callable[..., Fetcher]]:
    """Build Fetchers from FetchCfg overrides (loopback 127.0.0.1 allowed, short timeouts); closed after."""
    made: list[Fetcher] = []

    def make(resolver: Any = None, **overrides: Any) -> Fetcher:
        cfg = FetchCfg(**({"allowed_networks": ("127.0.0.1/32",)} | FAST | overrides))
        made.append(Fetcher(cfg, resolver=resolver))
        return made[-1]

    yield make
    for fetcher in made:
        fetcher.close()


def fail_status(fetcher: Fetcher, uri: Any) -> FetchError:
    """The FetchError raised for `uri`."""
    with pytest.raises(FetchError) as info:
        fetcher.fetch(uri)
    return info.value


def key() -> str:
    """A unique path segment, so per-path server counters start at zero."""
    return uuid.uuid4().hex


# ---------------------------------------------------------------- URIs and schemes


@pytest.mark.parametrize("uri", ["gopher://127.0.0.1:70/x", "ftp://example.com/a.jpg", "dict://127.0.0.1:11211/",
                                 "data:image/png;base64,iVBORw0KGgo=", "jar:http://x/y!/z", "ldap://x/"])
def test_unsupported_schemes_are_blocked(make_fetcher: Callable[..., Fetcher], uri: str) -> None:
    err = fail_status(make_fetcher(), uri)
    assert (err.status, err.attempts) == (status.BLOCKED_SCHEME, 0)


@pytest.mark.parametrize("uri", [None, 42, "", "   ", "http://", "http:///a.jpg", "s3://bucket", "s3://b/key",
                                 "s3:bucket/key", "http://user:pw@127.0.0.1/a.jpg", "http://a\\b/c.jpg",
                                 "http://exa mple.com/", "http://127.0.0.1:99999/", "http://256.1.1.1/",
                                 "http://%31%32%37.0.0.1/", "file://fileserver/share/a.jpg", "a\x00b.jpg"])
def test_malformed_uris_are_bad(make_fetcher: Callable[..., Fetcher], uri: Any) -> None:
    assert fail_status(make_fetcher(), uri).status == status.BAD_URI


def test_schemes_can_be_switched_off(make_fetcher: Callable[..., Fetcher], hostile_images: dict[str, Path],
                                     http_server: HttpServer) -> None:
    fetcher = make_fetcher(allowed_schemes=("s3",))
    path = hostile_images["jpeg"]
    for uri in (str(path), path.as_uri(), http_server.url("/image.jpg")):
        assert fail_status(fetcher, uri).status == status.BLOCKED_SCHEME


# ---------------------------------------------------------------- local files


def test_local_paths_and_file_uris(make_fetcher: Callable[..., Fetcher], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "dir with space" / "a#1.jpg"
    target.parent.mkdir()
    target.write_bytes(b"jpeg-bytes")
    fetcher = make_fetcher()
    assert fetcher.fetch(str(target)) == b"jpeg-bytes"
    assert fetcher.fetch(target.as_uri()) == b"jpeg-bytes"  # percent-encoded space and '#'
    assert fetcher.fetch("file://localhost" + quote(str(target))) == b"jpeg-bytes"
    monkeypatch.chdir(tmp_path)
    assert fetcher.fetch("dir with space/a#1.jpg") == b"jpeg-bytes"


def test_local_roots_confine_reads(make_fetcher: Callable[..., Fetcher], tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "ok.jpg").write_bytes(b"ok")
    (outside / "secret.txt").write_bytes(b"secret")
    (root / "escape.jpg").symlink_to(outside / "secret.txt")
    (root / "inner.jpg").symlink_to(root / "sub" / "ok.jpg")
    (root / "sibling").symlink_to(outside)
    fetcher = make_fetcher(local_roots=(str(root),))
    assert fetcher.fetch(str(root / "sub" / "ok.jpg")) == b"ok"
    assert fetcher.fetch(str(root / "inner.jpg")) == b"ok"  # symlinks that stay inside are fine
    blocked = [str(root / "sub" / ".." / ".." / "outside" / "secret.txt"), str(root / "escape.jpg"),
               str(root / "sibling" / "secret.txt"), "/etc/passwd", "file:///etc/passwd",
               (root / "escape.jpg").as_uri(), str(root) + "-evil/x.jpg"]
    for uri in blocked:
        assert fail_status(fetcher, uri).status == status.BLOCKED_PATH, uri
    assert fail_status(fetcher, str(root / "missing.jpg")).status == status.NOT_FOUND


def test_local_special_files_and_caps(make_fetcher: Callable[..., Fetcher], tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    big = tmp_path / "big.jpg"
    big.write_bytes(b"x" * 2000)
    fetcher = make_fetcher(max_bytes=1000)
    assert fail_status(fetcher, str(fifo)).status == status.BLOCKED_PATH  # and does not hang
    assert fail_status(fetcher, str(tmp_path)).status == status.BLOCKED_PATH
    assert fail_status(fetcher, "/dev/zero").status == status.BLOCKED_PATH
    assert fail_status(fetcher, str(big)).status == status.TOO_LARGE
    assert fail_status(fetcher, str(tmp_path / "nope" / "x.jpg")).status == status.NOT_FOUND


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_local_permission_denied(make_fetcher: Callable[..., Fetcher], tmp_path: Path) -> None:
    locked = tmp_path / "locked.jpg"
    locked.write_bytes(b"x")
    locked.chmod(0)
    assert fail_status(make_fetcher(), str(locked)).status == status.ACCESS_DENIED


def test_local_permission_errors_are_classified(make_fetcher: Callable[..., Fetcher], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs as root too (which ignores file modes): the OS refusal is simulated at os.open.
    from mumic_batch.io import fetch_local

    def refuse(*_: Any) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    target = tmp_path / "a.jpg"
    target.write_bytes(b"x")
    monkeypatch.setattr(fetch_local.os, "open", refuse)
    assert fail_status(make_fetcher(), str(target)).status == status.ACCESS_DENIED


def test_unexpected_errors_become_internal_error(make_fetcher: Callable[..., Fetcher], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from mumic_batch.io import fetch as fetch_module

    def broken(*_: Any) -> bytes:
        raise RuntimeError("bug")

    monkeypatch.setattr(fetch_module, "read_local", broken)
    err = fail_status(make_fetcher(), str(tmp_path / "a.jpg"))
    assert err.status == status.INTERNAL_ERROR and "RuntimeError" in err.message


# ---------------------------------------------------------------- HTTP: success, headers, statuses


def test_http_image_and_request_headers(make_fetcher: Callable[..., Fetcher], http_server: HttpServer) -> None:
    fetcher = make_fetcher(user_agent="mumic-test/1")
    result = fetcher.fetch_detailed(http_server.url("/image.jpg"))
    assert (result.data, result.attempts) == (http_server.jpeg, 1)
    headers = json.loads(fetcher.fetch(http_server.url("/echo-headers")))
    assert headers["Host"] == f"127.0.0.1:{http_server.port}"
    assert headers["Accept-Encoding"] == "identity"
    assert headers["User-Agent"] == "mumic-test/1"


@pytest.mark.parametrize(("code", "expected", "hits"), [(404, "http_404", 1), (403, "http_403", 1),
                                                        (410, "http_410", 1), (500, "http_500", 3),
                                                        (503, "http_503", 3)])
def test_http_error_statuses_and_which_are_retried(make_fetcher: Callable[..., Fetcher], http_server: HttpServer,
                                                   code: int, expected: str, hits: int) -> None:
    url = http_server.url(f"/status/{code}")
    before = http_server.hits(url)
    err = fail_status(make_fetcher(), url)
    assert (err.status, err.attempts) == (expected, hits)
    assert http_server.hits(url) - before == hits


def test_http_transient_error_then_success(make_fetcher: Callable[..., Fetcher], http_server: HttpServer) -> None:
    url = http_server.url(f"/flaky/{key()}?fail=2&code=502")
    result = make_fetcher().fetch_detailed(url)
    assert (result.data, result.attempts, http_server.hits(url)) == (http_server.jpeg, 3, 3)


def test_http_429_waits_for_retry_after(make_fetcher: Callable[..., Fetcher], http_server: HttpServer) -> None:
    url = http_server.url(f"/retry-after/{key()}?seconds=1")
    start = time.monotonic()
    result = make_fetcher().fetch_detailed(url)
    assert result.data == http_server.jpeg and result.attempts == 2
    assert time.monotonic() - start >= 0.9  # Retry-After: 1 honoured (backoff alone is 10 ms)


def test_http_retry_after_beyond_deadline_gives_up_at_once(make_fetcher: Callable[..., Fetcher],
                                                           http_server: HttpServer) -> None:
    url = http_server.url(f"/retry-after/{key()}?seconds=60")
    err = fail_status(make_fetcher(deadline_s=2.0), url)
    assert (err.status, http_server.hits(url)) == ("http_429", 1)


def test_connection_refused_is_retried_then_fetch_error(make_fetcher: Callable[..., Fetcher]) -> None:
    err = fail_status(make_fetcher(), f"http://127.0.0.1:{free_port()}/a.jpg")
    assert (err.status, err.attempts) == (status.FETCH_ERROR, 3)


# ---------------------------------------------------------------- HTTP: timeouts and byte caps


def test_slow_response_times_out_per_attempt(make_fetcher: Callable[..., Fetcher], http_server: HttpServer) -> None:
    url = http_server.url(f"/slow?delay=2&k={key()}")
    err = fail_status(make_fetcher(max_attempts=2), url)
    assert (err.status, err.attempts) == (status.TIMEOUT, 2)


@pytest.mark.parametrize("route", ["/drip?interval=0.1", "/drip-headers?interval=0.1"])
def test_slow_drip_ends_at_the_deadline(make_fetcher: Callable[..., Fetcher], http_server: HttpServer,
                                        route: str) -> None:
    # Every byte arrives well within the 0.5 s read timeout; only the 1.5 s deadline can stop it.
    start = time.monotonic()
    err = fail_status(make_fetcher(deadline_s=1.5), http_server.url(route))
    assert err.status == status.TIMEOUT
    assert time.monotonic() - start < 1.5 + 1.0


@pytest.mark.parametrize("route", ["/big?size=5000000", "/no-length?size=5000000", "/chunked-lie",
                                   "/endless-chunked"])
def test_oversized_bodies_are_cut_at_max_bytes(make_fetcher: Callable[..., Fetcher], http_server: HttpServer,
                                               route: str) -> None:
    url = http_server.url(route)
    before = http_server.hits(url)
    err = fail_status(make_fetcher(max_bytes=1_000_000), url)
    assert (err.status, err.attempts, http_server.hits(url) - before) == (status.TOO_LARGE, 1, 1)


def test_watchdog_wakes_for_an_earlier_deadline() -> None:
    # It sleeps until the earliest end it knows and is woken only by an earlier one: a socket
    # registered later with a nearer deadline must still be shut down at that deadline.
    import socket

    from mumic_batch.io.watchdog import Watchdog

    watchdog = Watchdog()
    far, near = socket.socketpair(), socket.socketpair()
    try:
        late = watchdog.watch(far[0], time.monotonic() + 60)
        time.sleep(0.2)  # let the thread start its 60 s sleep (if it has not, the test is merely easier)
        soon = watchdog.watch(near[0], time.monotonic() + 0.2)
        near[0].settimeout(10)  # only a missed wake-up would get this far
        assert near[0].recv(1) == b""  # shut down: end of data, not a timeout
        assert soon.fired and not late.fired
        watchdog.release(late)
    finally:
        watchdog.close()
        for sock in (*far, *near):
            sock.close()


def test_body_longer_than_content_length_is_never_read(make_fetcher: Callable[..., Fetcher],
                                                       http_server: HttpServer) -> None:
    data = make_fetcher().fetch(http_server.url("/lying-length?claim=1000&size=5000000"))
    assert len(data) == 1000  # HTTP framing ends the body at the declared length


def test_body_shorter_than_content_length_is_an_error(make_fetcher: Callable[..., Fetcher],
                                                      http_server: HttpServer) -> None:
    err = fail_status(make_fetcher(), http_server.url(f"/lying-length?claim=5000&size=1000&k={key()}"))
    assert (err.status, err.attempts) == (status.FETCH_ERROR, 3)  # a cut-off body is retried, never kept


def test_compressed_body_is_refused_not_inflated(make_fetcher: Callable[..., Fetcher],
                                                 http_server: HttpServer) -> None:
    err = fail_status(make_fetcher(), http_server.url("/gzip"))
    assert err.status == status.FETCH_ERROR and "gzip" in err.message


def test_html_served_as_jpeg_fails_at_decode(make_fetcher: Callable[..., Fetcher], http_server: HttpServer) -> None:
    data = make_fetcher().fetch(http_server.url("/html-as-jpeg"))
    with pytest.raises(status.ImageError) as info:
        decode_image(data, DecodeCfg())
    assert info.value.status == status.DECODE_ERROR


# ---------------------------------------------------------------- HTTP: redirects and SSRF


def redirect(http_server: HttpServer, to: str, code: int = 302) -> str:
    """URL on the test server that redirects to `to`."""
    return http_server.url(f"/redirect?code={code}&to={quote(to, safe='')}")


def test_redirects_are_followed_up_to_the_limit(make_fetcher: Callable[..., Fetcher], http_server: HttpServer) -> None:
    result = make_fetcher(max_redirects=3).fetch_detailed(http_server.url("/redirect-chain/3"))
    assert (result.data, result.attempts) == (http_server.jpeg, 4)
    err = fail_status(make_fetcher(max_redirects=3), http_server.url("/redirect-chain/4"))
    assert err.status == status.TOO_MANY_REDIRECTS
    assert fail_status(make_fetcher(max_redirects=0), http_server.url("/redirect-chain/1")).status == \
        status.TOO_MANY_REDIRECTS
    for code in (301, 303, 307, 308):
        assert make_fetcher().fetch(redirect(http_server, http_server.url("/image.jpg"), code)) == http_server.jpeg


def test_redirect_to_canary_is_blocked(make_fetcher: Callable[..., Fetcher], http_server: HttpServer,
                                       canary: Canary) -> None:
    before = canary.connections
    err = fail_status(make_fetcher(), redirect(http_server, canary.url("/latest/meta-data/")))
    assert err.status == status.BLOCKED_DESTINATION
    assert fail_status(make_fetcher(), canary.url("/direct")).status == status.BLOCKED_DESTINATION
    assert canary.connections == before


def test_canary_counts_when_allowed(make_fetcher: Callable[..., Fetcher], canary: Canary) -> None:
    # Positive control: the canary does see a fetcher that is allowed to reach it.
    before = canary.connections
    fetcher = make_fetcher(allowed_networks=("127.0.0.2/32",), max_attempts=1)
    assert fail_status(fetcher, canary.url("/")).status == status.FETCH_ERROR  # it hangs up at once
    assert canary.connections == before + 1


@pytest.mark.parametrize("target", ["http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/",
                                    "http://metadata.google.internal/computeMetadata/v1/", "http://10.0.0.1/",
                                    "http://2130706434/", "http://0x7f.2/", "http://[::ffff:127.0.0.2]/",
                                    "http://192.168.0.1/", "http://100.100.100.200/"])
def test_redirect_to_internal_targets_is_blocked(make_fetcher: Callable[..., Fetcher], http_server: HttpServer,
                                                 target: str) -> None:
    assert fail_status(make_fetcher(), redirect(http_server, target)).status == status.BLOCKED_DESTINATION


@pytest.mark.parametrize("target", ["file:///etc/passwd", "gopher://127.0.0.1:25/", "s3://bucket/key",
                                    "ftp://127.0.0.1/x"])
def test_redirect_to_other_schemes_is_blocked(make_fetcher: Callable[..., Fetcher], http_server: HttpServer,
                                              target: str) -> None:
    assert fail_status(make_fetcher(), redirect(http_server, target)).status == status.BLOCKED_SCHEME


SSRF_CORPUS = ["http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/latest/meta-data/",
               "http://metadata.google.internal/", "http://127.0.0.1:{port}/image.jpg", "http://localhost:{port}/",
               "http://2130706433:{port}/", "http://0x7f.1:{port}/", "http://0177.0.0.1:{port}/",
               "http://127.1:{port}/", "http://[::ffff:127.0.0.1]:{port}/", "http://[::1]:{port}/",
               "http://10.0.0.1/", "http://172.16.0.1/", "http://192.168.1.1/", "http://100.64.0.1/",
               "http://0.0.0.0:{port}/", "https://169.254.169.254/", "http://[fe80::1]/"]


@pytest.mark.parametrize("template", SSRF_CORPUS)
def test_ssrf_corpus_is_blocked_without_connecting(make_fetcher: Callable[..., Fetcher], http_server: HttpServer,
                                                   loopback_only: list[str], template: str) -> None:
    fetcher = make_fetcher(allowed_networks=())  # production default: nothing internal is allowed
    assert fail_status(fetcher, template.format(port=http_server.port)).status == status.BLOCKED_DESTINATION
    assert loopback_only == []


def test_host_allowlist(make_fetcher: Callable[..., Fetcher], http_server: HttpServer) -> None:
    fetcher = make_fetcher(allowed_hosts=("images.example.com",))
    assert fail_status(fetcher, http_server.url("/image.jpg")).status == status.BLOCKED_HOST
    assert make_fetcher(allowed_hosts=("127.0.0.1",)).fetch(http_server.url("/image.jpg")) == http_server.jpeg


class Rebinder:
    """DNS stub: the first answer is the test server, every later one the canary."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        return ["127.0.0.1"] if self.calls == 1 else ["127.0.0.2"]


def test_dns_rebinding_cannot_switch_the_address(make_fetcher: Callable[..., Fetcher], http_server: HttpServer,
                                                 canary: Canary, loopback_only: list[str]) -> None:
    before = canary.connections
    rebinder = Rebinder()
    data = make_fetcher(resolver=rebinder).fetch(f"http://rebind.test:{http_server.port}/image.jpg")
    assert data == http_server.jpeg and rebinder.calls == 1 and loopback_only == ["127.0.0.1"]
    # A redirect is a new hop: it is resolved and checked again, and now meets the canary address.
    err = fail_status(make_fetcher(resolver=Rebinder()), f"http://rebind.test:{http_server.port}/redirect-chain/1")
    assert err.status == status.BLOCKED_DESTINATION
    assert canary.connections == before


def test_mixed_dns_answers_are_blocked(make_fetcher: Callable[..., Fetcher], http_server: HttpServer) -> None:
    fetcher = make_fetcher(resolver=lambda host, port: ["127.0.0.1", "169.254.169.254"])
    assert fail_status(fetcher, f"http://mixed.test:{http_server.port}/image.jpg").status == \
        status.BLOCKED_DESTINATION


def test_concurrent_fetches_share_one_fetcher(make_fetcher: Callable[..., Fetcher], http_server: HttpServer) -> None:
    fetcher = make_fetcher()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(fetcher.fetch, [http_server.url(f"/image.jpg?i={i}") for i in range(32)]))
    assert all(r == http_server.jpeg for r in results)


# ---------------------------------------------------------------- HTTPS: pinned address, SNI, verification


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HttpServer, Path]]:
    """The test routes over TLS for `images.test` (cert from a throwaway CA); yields (server, ca_file)."""
    pytest.importorskip("cryptography")
    folder = tmp_path_factory.mktemp("tls")
    ca_file, context = make_tls_files(folder, "images.test")
    server = _Server(("127.0.0.1", 0), _Handler)
    server.fixture = HttpServer(server, make_jpeg(), b"")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield server.fixture, ca_file
    server.shutdown()
    server.server_close()


def test_https_connects_to_pinned_address_with_sni(make_fetcher: Callable[..., Fetcher],
                                                   https_server: tuple[HttpServer, Path]) -> None:
    server, ca_file = https_server
    resolve = lambda host, port: ["127.0.0.1"]  # noqa: E731 - the names below exist only here
    fetcher = make_fetcher(resolver=resolve, ca_bundle=str(ca_file))
    assert fetcher.fetch(f"https://images.test:{server.port}/image.jpg") == server.jpeg
    headers = json.loads(fetcher.fetch(f"https://images.test:{server.port}/echo-headers"))
    assert headers["Host"] == f"images.test:{server.port}"
    # The certificate is for images.test: another name on the same address fails verification.
    wrong = fail_status(fetcher, f"https://other.test:{server.port}/image.jpg")
    assert wrong.status == status.FETCH_ERROR and "tls" in wrong.message and wrong.attempts == 1
    untrusted = make_fetcher(resolver=resolve)  # system CA store: the test CA is unknown
    assert fail_status(untrusted, f"https://images.test:{server.port}/image.jpg").status == status.FETCH_ERROR


# ---------------------------------------------------------------- keep-alive: pooled connections under the same checks


def names_to_loopback(host: str, port: int) -> list[str]:
    """DNS stub: every name is the test server's address."""
    return ["127.0.0.1"]


def test_connections_are_reused_for_one_host(make_fetcher: Callable[..., Fetcher]) -> None:
    with start_server(keep_alive=True) as server:
        fetcher = make_fetcher()
        for i in range(10):
            result = fetcher.fetch_detailed(server.url(f"/image.jpg?i={i}"))
            assert (result.data, result.attempts) == (server.jpeg, 1)
        assert server.connections == 1
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(fetcher.fetch, [server.url(f"/image.jpg?j={i}") for i in range(64)]))
        assert all(r == server.jpeg for r in results)
        assert server.connections <= 8  # a connection is opened only when none is idle


def test_https_connections_are_reused_with_sni(make_fetcher: Callable[..., Fetcher],
                                               tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    ca_file, context = make_tls_files(tmp_path, "images.test")
    with start_server(keep_alive=True, tls=context) as server:
        fetcher = make_fetcher(resolver=names_to_loopback, ca_bundle=str(ca_file))
        for _ in range(5):
            assert fetcher.fetch(f"https://images.test:{server.port}/image.jpg") == server.jpeg
        assert server.connections == 1
        # The pooled connection was verified for images.test: another name gets its own
        # connection, and fails the certificate check there.
        wrong = fail_status(fetcher, f"https://other.test:{server.port}/image.jpg")
        assert wrong.status == status.FETCH_ERROR and "tls" in wrong.message


def test_pool_off_opens_a_connection_per_request(make_fetcher: Callable[..., Fetcher]) -> None:
    with start_server(keep_alive=True) as server:
        fetcher = make_fetcher(pool_connections=0)
        for _ in range(3):
            assert fetcher.fetch(server.url("/image.jpg")) == server.jpeg
        assert server.connections == 3


def test_redirects_to_other_hosts_never_share_a_connection(make_fetcher: Callable[..., Fetcher],
                                                           canary: Canary) -> None:
    with start_server(keep_alive=True) as server:
        fetcher = make_fetcher(resolver=names_to_loopback)
        a, b = f"http://a.test:{server.port}", f"http://b.test:{server.port}"
        assert fetcher.fetch(f"{a}/image.jpg") == server.jpeg  # leaves an idle connection for a.test
        hop = quote(f"{b}/image.jpg", safe="")
        result = fetcher.fetch_detailed(f"{a}/redirect?to={hop}")
        assert (result.data, result.attempts) == (server.jpeg, 2)
        assert fetcher.fetch(f"{b}/image.jpg") == server.jpeg
        assert fetcher.fetch(f"{a}/image.jpg") == server.jpeg
        # Same address and port, but every connection carried requests for one name only.
        carried = server.hosts_per_connection()
        assert all(len(hosts) == 1 for hosts in carried.values()), carried
        assert {h for hosts in carried.values() for h in hosts} == {f"a.test:{server.port}", f"b.test:{server.port}"}
        before = (canary.connections, server.connections)
        err = fail_status(fetcher, f"{a}/redirect?to={quote(canary.url('/latest/meta-data/'), safe='')}")
        assert err.status == status.BLOCKED_DESTINATION
        assert (canary.connections, server.connections) == before  # the hop was refused before any connection


class RebindAfterFirst:
    """DNS stub: the test server first, then an address outside allowed_networks."""

    def __init__(self, later: str) -> None:
        self.later = later
        self.calls = 0

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        return ["127.0.0.1"] if self.calls == 1 else [self.later]


@pytest.mark.parametrize("later", ["127.0.0.2", "169.254.169.254"])
def test_changed_dns_answer_is_checked_before_any_pooled_connection(make_fetcher: Callable[..., Fetcher],
                                                                    canary: Canary, loopback_only: list[str],
                                                                    later: str) -> None:
    with start_server(keep_alive=True) as server:
        resolver = RebindAfterFirst(later)
        fetcher = make_fetcher(resolver=resolver)
        url = f"http://rebind.test:{server.port}/image.jpg"
        assert fetcher.fetch(url) == server.jpeg  # an idle connection to 127.0.0.1 is now pooled
        before = (canary.connections, server.hits(url))
        assert fail_status(fetcher, url).status == status.BLOCKED_DESTINATION
        # Resolved and checked again; neither the pooled connection nor a new one was used.
        assert resolver.calls == 2 and (canary.connections, server.hits(url)) == before
        assert loopback_only == ["127.0.0.1"]


def test_server_closing_idle_connections_costs_no_row(make_fetcher: Callable[..., Fetcher]) -> None:
    with start_server(keep_alive=True, idle_timeout_s=0.2) as server:
        fetcher = make_fetcher(max_attempts=1)
        assert fetcher.fetch(server.url("/image.jpg")) == server.jpeg
        for _ in range(200):  # until the server has closed its side (0.2 s, more on a busy machine)
            if server.closed_connections:
                break
            time.sleep(0.05)
        assert server.closed_connections == 1
        result = fetcher.fetch_detailed(server.url("/image.jpg"))
        assert (result.data, result.attempts, server.connections) == (server.jpeg, 1, 2)


def test_connection_closed_as_the_request_arrives_is_resent_once(make_fetcher: Callable[..., Fetcher]) -> None:
    with start_server(keep_alive=True) as server:
        fetcher = make_fetcher(max_attempts=1)
        for _ in range(3):
            result = fetcher.fetch_detailed(server.url("/once-per-connection"))
            assert (result.data, result.attempts) == (server.jpeg, 1)
        # Each reuse met a closed connection and was sent again on a new one, as the same attempt.
        assert server.connections == 3 and server.hits("/once-per-connection") == 5


def test_idle_connections_expire_on_our_side(make_fetcher: Callable[..., Fetcher]) -> None:
    with start_server(keep_alive=True) as server:
        fetcher = make_fetcher(pool_idle_s=0.1)
        assert fetcher.fetch(server.url("/image.jpg")) == server.jpeg
        time.sleep(0.3)
        assert fetcher.fetch(server.url("/image.jpg")) == server.jpeg
        assert server.connections == 2


def test_pool_is_bounded_under_many_hosts(make_fetcher: Callable[..., Fetcher],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Any] = []
    dial = fetch_http.open_socket  # the loopback guard

    def counting(ip: Any, port: int, timeout: float) -> Any:
        opened.append(dial(ip, port, timeout))
        return opened[-1]

    monkeypatch.setattr(fetch_http, "open_socket", counting)
    with start_server(keep_alive=True) as server:
        fetcher = make_fetcher(resolver=names_to_loopback, pool_connections=4)
        for i in range(40):
            assert fetcher.fetch(f"http://h{i}.test:{server.port}/image.jpg") == server.jpeg
        assert len(opened) == 40
        assert sum(sock.fileno() != -1 for sock in opened) == 4  # the newest four are kept
        assert fetcher.fetch(f"http://h39.test:{server.port}/image.jpg") == server.jpeg
        assert fetcher.fetch(f"http://h0.test:{server.port}/image.jpg") == server.jpeg
        assert len(opened) == 41 and server.connections == 41
        fetcher.close()
        assert all(sock.fileno() == -1 for sock in opened)


# ---------------------------------------------------------------- S3 (moto server in its own process)


def s3_cfg(s3: S3Server, **overrides: Any) -> dict[str, Any]:
    """FetchCfg overrides for the moto server."""
    return {"s3_endpoint_url": s3.endpoint_url, "s3_region": s3.region, "allowed_buckets": (s3.bucket,)} | overrides


def inject(fetcher: Fetcher, answers: list[tuple[int, bytes]], repeat_last: bool = False) -> list[int]:
    """Answer the next GetObject sends with canned (status, body) pairs; returns the sent-count list."""
    from botocore.awsrequest import AWSResponse

    class Raw:
        def __init__(self, body: bytes) -> None:
            self.body = body

        def stream(self, **_: Any) -> Iterator[bytes]:
            yield self.body

    queue, sent = list(answers), [0]

    def handler(request: Any, **_: Any) -> AWSResponse | None:
        sent[0] += 1
        if not queue:
            return None
        code, body = queue[0] if repeat_last and len(queue) == 1 else queue.pop(0)
        return AWSResponse(request.url, code, {}, Raw(body))

    fetcher.s3_client().meta.events.register("before-send.s3.GetObject", handler)
    return sent


def s3_error(code: str, message: str = "injected") -> bytes:
    """An S3 XML error body."""
    return f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>r</RequestId></Error>".encode()


def test_s3_reads_objects(make_fetcher: Callable[..., Fetcher], s3_env: S3Server) -> None:
    jpeg = make_jpeg(64, 48)
    uri = s3_env.put("images/a b?#%.jpg", jpeg)  # '?', '#', '%' are plain key characters in s3
    fetcher = make_fetcher(**s3_cfg(s3_env))
    result = fetcher.fetch_detailed(uri)
    assert (result.data, result.attempts) == (jpeg, 1)
    assert fetcher.fetch(uri.replace("s3://", "s3a://")) == jpeg
    assert fetcher.s3_client() is fetcher.s3_client()
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(fetcher.fetch, [uri] * 16)) == {jpeg}


def test_s3_missing_objects_and_buckets(make_fetcher: Callable[..., Fetcher], s3_env: S3Server) -> None:
    fetcher = make_fetcher(**s3_cfg(s3_env, allowed_buckets=()))
    sent = inject(fetcher, [])
    err = fail_status(fetcher, f"s3://{s3_env.bucket}/missing.jpg")
    assert (err.status, err.attempts, sent[0]) == (status.NOT_FOUND, 1, 1)  # NoSuchKey is not retried
    assert fail_status(fetcher, "s3://no-such-bucket-here/a.jpg").status == status.NOT_FOUND


def test_s3_bucket_allowlist(make_fetcher: Callable[..., Fetcher], s3_env: S3Server) -> None:
    s3_env.create_bucket("other-bucket")
    uri = s3_env.put("a.jpg", b"x", bucket="other-bucket")
    err = fail_status(make_fetcher(**s3_cfg(s3_env)), uri)
    assert (err.status, err.attempts) == (status.BLOCKED_BUCKET, 0)


def test_s3_size_cap(make_fetcher: Callable[..., Fetcher], s3_env: S3Server) -> None:
    uri = s3_env.put("big.bin", b"x" * 5000)
    assert fail_status(make_fetcher(**s3_cfg(s3_env, max_bytes=4999)), uri).status == status.TOO_LARGE
    assert len(make_fetcher(**s3_cfg(s3_env, max_bytes=5000)).fetch(uri)) == 5000


def test_s3_throttling_is_retried(make_fetcher: Callable[..., Fetcher], s3_env: S3Server) -> None:
    uri = s3_env.put("throttled.jpg", b"jpeg")
    fetcher = make_fetcher(**s3_cfg(s3_env))
    inject(fetcher, [(503, s3_error("SlowDown")), (503, s3_error("SlowDown"))])
    result = fetcher.fetch_detailed(uri)
    assert (result.data, result.attempts) == (b"jpeg", 3)
    always = make_fetcher(**s3_cfg(s3_env))
    inject(always, [(503, s3_error("SlowDown"))], repeat_last=True)
    err = fail_status(always, uri)
    assert (err.status, err.attempts) == (status.THROTTLED, 3)


def test_s3_access_denied(make_fetcher: Callable[..., Fetcher], s3_env: S3Server) -> None:
    uri = s3_env.put("denied.jpg", b"jpeg")
    fetcher = make_fetcher(**s3_cfg(s3_env))
    inject(fetcher, [(403, s3_error("AccessDenied"))])
    err = fail_status(fetcher, uri)
    assert (err.status, err.attempts) == (status.ACCESS_DENIED, 1)


def test_s3_expected_bucket_owner_is_sent(make_fetcher: Callable[..., Fetcher], s3_env: S3Server) -> None:
    # moto does not enforce ExpectedBucketOwner, so play S3's part: 403 when the owner differs.
    from botocore.awsrequest import AWSResponse

    uri = s3_env.put("owned.jpg", b"jpeg")
    seen: list[str | None] = []

    def owner_check(request: Any, **_: Any) -> AWSResponse | None:
        owner = request.headers.get("x-amz-expected-bucket-owner")
        seen.append(owner.decode() if isinstance(owner, bytes) else owner)
        if seen[-1] not in (None, "123456789012"):  # moto's default account id
            return AWSResponse(request.url, 403, {}, type("Raw", (), {"stream": lambda self, **_: iter(
                [s3_error("AccessDenied")])})())
        return None

    for owner, expected in (("999999999999", status.ACCESS_DENIED), ("123456789012", None)):
        fetcher = make_fetcher(**s3_cfg(s3_env, s3_expected_bucket_owner=owner))
        fetcher.s3_client().meta.events.register("before-send.s3.GetObject", owner_check)
        if expected is None:
            assert fetcher.fetch(uri) == b"jpeg"
        else:
            assert fail_status(fetcher, uri).status == expected
    assert seen == ["999999999999", "123456789012"]


def test_s3_timeouts(make_fetcher: Callable[..., Fetcher], s3_env: S3Server) -> None:
    from botocore.exceptions import ReadTimeoutError

    uri = s3_env.put("slow.jpg", b"jpeg")
    fetcher = make_fetcher(**s3_cfg(s3_env))

    def time_out(request: Any, **_: Any) -> None:
        raise ReadTimeoutError(endpoint_url=request.url)

    fetcher.s3_client().meta.events.register("before-send.s3.GetObject", time_out)
    err = fail_status(fetcher, uri)
    assert (err.status, err.attempts) == (status.TIMEOUT, 3)


def test_s3_body_broken_off_is_retried(make_fetcher: Callable[..., Fetcher], s3_env: S3Server,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.response import StreamingBody

    uri = s3_env.put("flaky-body.jpg", b"jpeg")
    real_read, calls = StreamingBody.read, [0]

    def read_once_broken(self: StreamingBody, amt: int | None = None) -> bytes:
        calls[0] += 1
        if calls[0] == 1:
            raise ConnectionResetError("reset mid-body")
        return real_read(self, amt)

    monkeypatch.setattr(StreamingBody, "read", read_once_broken)
    result = make_fetcher(**s3_cfg(s3_env)).fetch_detailed(uri)
    assert (result.data, result.attempts) == (b"jpeg", 2)
