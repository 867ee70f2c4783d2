"""HTTPS fetch rate and client CPU per image: one connection per request vs pooled keep-alive.

A TLS server on loopback (its own process, a throwaway CA as in the tests) serves 640x480 sample
JPEGs, each answer delayed 20-50 ms like a CDN. The same `Fetcher` fetches them with
`fetch.pool_connections=0` (the path before pooling: `Connection: close`, a TCP connect and a
TLS handshake per image) and with the default pool, side by side at several thread counts,
alternating the two paths in every round. It prints images/s and the CPU seconds this process
(the fetch client) and the server process spent per 1,000 images, plus the machine and its load.
Unpaced cells fetch as fast as the threads allow (pooling also saves the handshake round trips,
so it is faster too); paced cells (`--paced`) start requests at one fixed rate on both paths, to
compare CPU per image at the same throughput.

    .venv/bin/python bench/fetch_rate.py                  # threads 4 16 32 + paced 150/s, 600 images a cell
    .venv/bin/python bench/fetch_rate.py --threads 8 --images 2000 --rounds 3 --paced 100 200

Needs the test extras (`cryptography` for the throwaway CA). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import random
import socket
import ssl
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/fetch_rate.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(REPO))

from mumic_batch.config import FetchCfg, SampleCfg  # noqa: E402
from mumic_batch.core.sample import generate_sample  # noqa: E402
from mumic_batch.io.fetch import Fetcher  # noqa: E402

HOST = "images.test"  # the certificate's name; the bench resolver maps it to 127.0.0.1
PATHS = {"old": 0, "pooled": FetchCfg.pool_connections}  # label -> fetch.pool_connections


# ------------------------------------------------------------------------------------------- server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless the client says Connection: close
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """No access log."""

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        """/img/<i>.jpg: sample image i modulo the set, after a 20-50 ms delay."""
        images = self.server.images
        index = int(self.path.rsplit("/", 1)[-1].split(".")[0]) % len(images)
        time.sleep(random.uniform(self.server.latency[0], self.server.latency[1]))
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(images[index])))
        self.end_headers()
        self.wfile.write(images[index])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    images: list[bytes]
    latency: tuple[float, float]
    context: ssl.SSLContext

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake runs in the connection's thread, not in the accept loop, so handshakes
        # of parallel clients do not queue behind each other. NODELAY as web servers set it:
        # without it the body waits for the ACK of the header segment, which the client delays
        # by 40 ms on a kept-alive connection.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        self.RequestHandlerClass(tls, client_address, self)


def serve(port_out: Any, folder: str, latency: tuple[float, float]) -> None:
    """Server process: listen on 127.0.0.1, report the port, serve until killed."""
    root = Path(folder)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.images = [p.read_bytes() for p in sorted((root / "sample" / "images").glob("*.jpg"))]
    server.latency = latency
    server.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.context.load_cert_chain(root / "leaf.pem", root / "leaf.key")
    port_out.put(server.server_address[1])
    server.serve_forever()


def process_cpu_s(pid: int) -> float:
    """utime + stime of another process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------- client


@dataclass
class Cell:
    path: str
    threads: int
    paced: float = 0.0  # requests started per second; 0: as fast as the threads go
    images: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    failed: int = 0
    loads: tuple[float, ...] = ()

    @property
    def rate(self) -> float:
        return self.images / self.wall_s if self.wall_s else 0.0

    def per_1000(self, seconds: float) -> float:
        return 1000 * seconds / self.images if self.images else float("nan")


def measure(cell: Cell, cfg: FetchCfg, port: int, n: int, server_pid: int, start_index: int) -> None:
    """Fetch n images with cfg on cell.threads threads; add the measurement to `cell`."""
    urls = [f"https://{HOST}:{port}/img/{start_index + i}.jpg" for i in range(n)]
    fetcher = Fetcher(cfg, resolver=lambda host, p: ["127.0.0.1"])
    failed = [0]

    def one(i: int) -> None:
        if cell.paced:
            time.sleep(max(0.0, wall + i / cell.paced - time.perf_counter()))
        try:
            fetcher.fetch(urls[i])
        except Exception:  # noqa: BLE001 - counted and printed, a failure must not stop the bench
            failed[0] += 1

    server_cpu, cpu, wall = process_cpu_s(server_pid), time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(cell.threads) as pool:
        list(pool.map(one, range(n)))
    fetcher.close()
    cell.wall_s += time.perf_counter() - wall
    cell.cpu_s += time.process_time() - cpu
    cell.server_cpu_s += process_cpu_s(server_pid) - server_cpu
    cell.images += n
    cell.failed += failed[0]
    cell.loads += (os.getloadavg()[0],)


# ------------------------------------------------------------------------------------------- report


def machine() -> str:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    cores = len(os.sched_getaffinity(0))
    return f"{cpu}, {cores} cores, Python {platform.python_version()}, {ssl.OPENSSL_VERSION}, {platform.node()}"


def report(cells: list[Cell], args: argparse.Namespace, load_before: float) -> None:
    print(f"machine: {machine()}")
    print(f"server: TLS 1.3 on 127.0.0.1 in its own process, {args.latency_ms[0]:g}-{args.latency_ms[1]:g} ms "
          f"per answer; {args.sample} sample JPEGs 640x480; {args.images} images per cell and round, "
          f"{args.rounds} round(s); load average before: {load_before:.2f}")
    print()
    head = ("threads", "paced at", "path", "images", "failed", "images/s", "client CPU s/1000",
            "server CPU s/1000", "client cores", "load (1 min)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for c in cells:
        loads = f"{min(c.loads):.1f}-{max(c.loads):.1f}"
        paced = f"{c.paced:g}/s" if c.paced else "-"
        print(f"| {c.threads} | {paced} | {c.path} | {c.images} | {c.failed} | {c.rate:.0f} | "
              f"{c.per_1000(c.cpu_s):.2f} | {c.per_1000(c.server_cpu_s):.2f} | {c.cpu_s / c.wall_s:.2f} | {loads} |")
    print()
    for old, pooled in zip(cells[::2], cells[1::2]):
        label = f"threads {old.threads}" + (f", paced at {old.paced:g}/s" if old.paced else "")
        print(f"{label}: pooled/old client CPU per image "
              f"{pooled.per_1000(pooled.cpu_s) / old.per_1000(old.cpu_s):.2f}, images/s {pooled.rate / old.rate:.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[4, 16, 32], help="fetch thread counts (default 4 16 32)")
    p.add_argument("--images", type=int, default=600, help="images per cell and round (default 600)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; each runs old then pooled per thread count")
    p.add_argument("--sample", type=int, default=64, help="distinct sample JPEGs served (default 64)")
    p.add_argument("--latency-ms", type=float, nargs=2, default=[20.0, 50.0], help="server delay range (ms)")
    p.add_argument("--paced", type=float, nargs="*", default=[150.0],
                   help="also run both paths starting requests at these rates (images/s; default 150)")
    p.add_argument("--paced-threads", type=int, default=16, help="threads of the paced cells (default 16)")
    args = p.parse_args(argv)

    from tests.fixtures.net import make_tls_files  # the tests' throwaway CA (needs cryptography)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fetch_rate_") as tmp:
        folder = Path(tmp)
        ca_file, _ = make_tls_files(folder, HOST)
        generate_sample(SampleCfg(out_dir=str(folder / "sample"), n_images=args.sample, seed=0))
        ctx = multiprocessing.get_context("spawn")
        ports = ctx.Queue()
        latency = (args.latency_ms[0] / 1000, args.latency_ms[1] / 1000)
        server = ctx.Process(target=serve, args=(ports, tmp, latency), daemon=True)
        server.start()
        try:
            port = ports.get(timeout=60)
            cells = [Cell(path, t) for t in args.threads for path in PATHS]
            cells += [Cell(path, args.paced_threads, rate) for rate in args.paced for path in PATHS]
            base = dict(allowed_networks=("127.0.0.1/32",), ca_bundle=str(ca_file))
            index = 0
            for _ in range(args.rounds):
                for cell in cells:
                    cfg = FetchCfg(**base, pool_connections=PATHS[cell.path])
                    measure(cell, cfg, port, args.images, server.pid, index)
                    index += args.images
        finally:
            server.terminate()
            server.join(timeout=10)
        report(cells, args, load_before)
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
