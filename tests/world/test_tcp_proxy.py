"""The fault proxy can stand for a real network: a bandwidth cap per connection and a delay
before each request's first byte (loopback hides both). Only lower bounds are asserted where a
loaded machine could only make things slower."""

from __future__ import annotations

import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fixtures import tcp_proxy
from fixtures.tcp_proxy import FaultProxy, Faults

SIZE = 1 << 20


def _server() -> tuple[socket.socket, tuple[str, int]]:
    """Answers every line it receives with SIZE bytes, on as many connections as asked."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            for _line in lines:
                conn.sendall(b"x" * SIZE)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener, listener.getsockname()


def _fetch(url: str, requests: int = 1) -> tuple[float, float]:
    """(seconds to the first byte of the first answer, seconds for all answers)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        start = time.monotonic()
        first = None
        for _ in range(requests):
            conn.sendall(b"GET /object HTTP/1.1\r\n")
            got = 0
            while got < SIZE:
                chunk = conn.recv(1 << 16)
                assert chunk, "connection closed early"
                first = first or time.monotonic() - start
                got += len(chunk)
        return first or 0.0, time.monotonic() - start


@pytest.mark.parametrize("pacing", ["kernel", "token-bucket"])
def test_bandwidth_is_capped_per_connection_and_the_first_byte_waits(monkeypatch, pacing):
    """The cap holds whether Linux paces the connection or the proxy's token bucket does
    (where the kernel cannot)."""
    if pacing == "token-bucket":
        monkeypatch.setattr(tcp_proxy, "_PACING", None)
    listener, upstream = _server()
    with FaultProxy(upstream) as proxy:
        proxy.faults = Faults(bandwidth=4 << 20, first_byte=0.2)
        first, whole = _fetch(proxy.url, requests=2)
        assert first >= 0.2  # the request waited before it reached the server
        # Two answers of 1 MiB at 4 MiB/s: at least the time of all but the first 256 KiB of
        # each (the kernel's pacing lets its first bursts go at once, as TCP does), plus the
        # two first-byte waits.
        assert whole >= 2 * ((SIZE - (256 << 10)) / (4 << 20)) + 0.4
        proxy.faults = Faults(bandwidth=4 << 20)  # the cap alone, nothing that overlaps
        _first, alone = _fetch(proxy.url)
        with ThreadPoolExecutor(3) as pool:
            start = time.monotonic()
            list(pool.map(lambda _: _fetch(proxy.url), range(3)))
            together = time.monotonic() - start
        # Three connections at once each get the cap: together about as long as one alone (a
        # cap shared by all would take three times as long).
        assert together < 2 * alone
        assert proxy.counters.paced == (5 if pacing == "kernel" and sys.platform == "linux" else 0)
        proxy.faults = Faults()
        _first, free = _fetch(proxy.url)
        assert free < whole  # without the faults: loopback speed again
    listener.close()
