"""Cached `token` round trip on one persistent connection, and throughput at 1 and 64 connections.

Targets (issue 2): median round trip <= 50 us; >= 20,000 requests/s at 64 connections on 2 cores.
The load generator is a separate process using a selectors loop (one request in flight per
connection, closed loop), so the broker gets its own core.
"""

from __future__ import annotations

import multiprocessing as mp
import selectors
import socket
import struct
import time

import common

from dc_token.protocol import Request, encode
from dc_token.sync import TokenClient

WARMUP = 2000
SAMPLES = 20000


def frame_len(buf: bytes) -> int:
    return 4 + struct.unpack(">I", buf[:4])[0] if len(buf) >= 4 else -1


def roundtrip_raw(sock_path: str) -> list[float]:
    """Pre-encoded request, blocking socket: measures the broker, not client-side encoding."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    frame = encode(Request(1, "token", {"profile": "demo", "min_ttl": 60}))
    out = []
    for i in range(WARMUP + SAMPLES):
        t0 = time.perf_counter()
        s.sendall(frame)
        buf = s.recv(65536)
        while len(buf) < frame_len(buf):
            buf += s.recv(65536)
        t1 = time.perf_counter()
        if i >= WARMUP:
            out.append(t1 - t0)
    s.close()
    return out


def roundtrip_client(sock_path: str) -> list[float]:
    """TokenClient.token() without its cache: a full round trip, encoding and decoding included."""
    out = []
    with TokenClient(sock_path, cache=False) as c:  # the round trip, not the in-process cache
        for i in range(WARMUP + SAMPLES):
            t0 = time.perf_counter()
            c.token("demo", min_ttl=60)
            t1 = time.perf_counter()
            if i >= WARMUP:
                out.append(t1 - t0)
    return out


def load(sock_path: str, connections: int, seconds: float, q: mp.Queue) -> None:  # type: ignore[type-arg]
    sel = selectors.DefaultSelector()
    frame = encode(Request(1, "token", {"profile": "demo", "min_ttl": 60}))
    bufs: dict[socket.socket, bytes] = {}
    for _ in range(connections):
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock_path)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        bufs[s] = b""
        s.send(frame)
    done = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj  # type: ignore[assignment]
            buf = bufs[s] + s.recv(65536)
            n = frame_len(buf)
            while n > 0 and len(buf) >= n:
                buf = buf[n:]
                done += 1
                s.send(frame)
                n = frame_len(buf)
            bufs[s] = buf
    elapsed = time.perf_counter() - start
    for s in bufs:
        s.close()
    q.put(done / elapsed)


def throughput(sock_path: str, connections: int, seconds: float = 3.0) -> float:
    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    p = mp.Process(target=load, args=(sock_path, connections, seconds, q))
    p.start()
    rate = q.get(timeout=seconds + 30)
    p.join()
    return float(rate)


def main() -> dict[str, object]:
    with common.dev() as (sock, _):
        TokenClient(sock).token("demo")
        raw = common.summary_us(roundtrip_raw(sock))
        client = common.summary_us(roundtrip_client(sock))
        rps1 = throughput(sock, 1)
        rps64 = throughput(sock, 64)
    result = {
        "roundtrip_raw": raw,
        "roundtrip_tokenclient": client,
        "rps_1_connection": rps1,
        "rps_64_connections": rps64,
        "targets": {"median_us": 50, "rps_64": 20000},
    }
    print(
        f"cached token round trip, one persistent connection ({raw['n']} samples):\n"
        f"  raw frame:        median {raw['median_us']:.1f} us   p99 {raw['p99_us']:.1f} us"
        "   (target median <= 50 us)\n"
        f"  TokenClient:      median {client['median_us']:.1f} us   p99 {client['p99_us']:.1f} us\n"
        f"throughput (closed loop, separate load process):\n"
        f"  1 connection:     {rps1:,.0f} requests/s\n"
        f"  64 connections:   {rps64:,.0f} requests/s   (target >= 20,000)"
    )
    print(f"  -> {common.write('roundtrip', result)}")
    return result


if __name__ == "__main__":
    main()
