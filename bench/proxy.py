"""`dc-broker proxy` overhead: the same small GET against the same local upstream, direct and through
the proxy; latency (p50, p99) and requests/s at 1 and 16 keep-alive connections.

Target (issue 15): p50 overhead per request <= 1 ms. The upstream is a minimal h11-on-trio server
in this file (the lightest honest upstream, so the overhead is the proxy's); the proxy a real
`dc-broker proxy` process in front of a `dc-broker dev` broker; the load generator a separate
process: a selectors loop over raw sockets with a pre-encoded request (closed loop, one request in
flight per connection), timing each response. Latency on a shared machine follows its load, so the
CPU time each process spends per request (utime + stime from /proc/PID/stat) is printed too.

    python bench/proxy.py [--seconds S]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import selectors
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import common

from dc_token.sync import TokenClient
from tests.e2e import DC_BROKER

PATH = "/echo"


async def _serve_upstream() -> None:
    """The bench's upstream: h11 on trio, keep-alive, answers every request with its headers as JSON
    (hypercorn, under this closed-loop load, drops connections after a client vanishes mid-request)."""
    import json

    import h11
    import trio

    async def connection(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                    continue
                if isinstance(event, h11.Request):
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                    body = json.dumps({"method": event.method.decode(), "headers": headers}).encode()
                elif isinstance(event, h11.EndOfMessage):
                    out = conn.send(
                        h11.Response(
                            status_code=200,
                            headers=[("content-type", "application/json"), ("content-length", str(len(body)))],
                        )
                    )
                    await stream.send_all(out + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (trio.BrokenResourceError, h11.ProtocolError):
            return

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}", flush=True)
    await trio.serve_listeners(connection, listeners)


@contextmanager
def upstream_process() -> Iterator[tuple[str, int]]:
    """The bench's upstream as a process: its URL and pid."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, __file__, "--serve-upstream"], stdout=subprocess.PIPE, text=True, cwd=root)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip(), proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def _request(host: str, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {PATH} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bench\r\n{auth}\r\n".encode()


def _complete(buf: bytes) -> int:
    """Length of the first complete response in buf (Content-Length framing), else 0."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return 0
    m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", buf[:end])
    assert m, buf[:end]
    total = end + 4 + int(m.group(1))
    return total if len(buf) >= total else 0


def load(address: str, connections: int, seconds: float, token: str | None, q: mp.Queue) -> None:  # type: ignore[type-arg]
    host, port = address.rsplit(":", 1)
    frame = _request(address, token)
    sel = selectors.DefaultSelector()
    state: dict[socket.socket, list[object]] = {}
    for _ in range(connections):
        s = socket.create_connection((host, int(port)))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        state[s] = [b"", time.perf_counter()]
        s.send(frame)
    latencies: list[float] = []
    start = time.perf_counter()
    end = start + seconds
    warm = start + min(1.0, seconds / 4)
    done = 0
    while time.perf_counter() < end:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj  # type: ignore[assignment]
            st = state[s]
            data = s.recv(65536)
            if not data:  # the server closed this connection: a benchmark that measures nothing
                raise SystemExit(f"{address} closed a keep-alive connection after {done} responses")
            buf = st[0] + data  # type: ignore[operator]
            n = _complete(buf)
            while n:
                now = time.perf_counter()
                if now >= warm:
                    latencies.append(now - st[1])  # type: ignore[operator]
                    done += 1
                buf = buf[n:]
                st[1] = now
                s.send(frame)
                n = _complete(buf)
            st[0] = buf
    elapsed = time.perf_counter() - warm
    for s in state:
        s.close()
    q.put((latencies, done / elapsed))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    address: str, connections: int, seconds: float, pids: dict[str, int], token: str | None = None
) -> dict[str, float]:
    """``token``: sent by the direct calls, so both paths carry (and the upstream echoes) the same bytes."""
    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    p = mp.Process(target=load, args=(address, connections, seconds, token, q))
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    p.start()
    latencies, rps = q.get(timeout=seconds + 60)
    p.join()
    xs = sorted(latencies)
    out = {
        "n": len(xs),
        "p50_ms": statistics.median(xs) * 1e3,
        "p99_ms": xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1e3,
        "rps": rps,
    }
    total = len(xs) / max(1e-9, 1 - min(1.0, seconds / 4) / seconds)  # the warm-up's requests count too
    for name, pid in pids.items():
        out[f"{name}_cpu_us_per_request"] = (cpu_seconds(pid) - before[name]) / total * 1e6
    return out


def main() -> dict[str, object]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    with common.dev() as (sock, _), upstream_process() as (upstream, upstream_pid):
        proxy = subprocess.Popen(
            [DC_BROKER, "proxy", "demo", "--socket", sock, "--upstream", upstream, "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert proxy.stdout is not None
            m = re.search(r"http://(\S+) ->", proxy.stdout.readline())
            assert m, "the proxy did not start"
            via = m.group(1)
            direct = urlsplit(upstream).netloc
            figures: dict[str, dict[str, float]] = {}
            pids = {"upstream": upstream_pid, "proxy": proxy.pid}
            with TokenClient(sock) as broker:
                token = broker.token("demo")
            measure(direct, 4, 2.0, pids, token)  # warm both processes up (imports, first connections)
            measure(via, 4, 2.0, pids)
            for connections in (1, 16):
                figures[f"direct_{connections}"] = measure(direct, connections, args.seconds, pids, token)
                figures[f"proxy_{connections}"] = measure(via, connections, args.seconds, pids)
        finally:
            proxy.terminate()
            proxy.wait(10)
    overhead = {c: figures[f"proxy_{c}"]["p50_ms"] - figures[f"direct_{c}"]["p50_ms"] for c in (1, 16)}
    result = {
        **figures,
        "p50_overhead_ms_1": overhead[1],
        "p50_overhead_ms_16": overhead[16],
        "target": {"p50_overhead_ms_1": 1.0},
    }
    lines = [f"GET {PATH} against a local upstream, direct vs through `dc-broker proxy` (closed loop):"]
    for c in (1, 16):
        for how in ("direct", "proxy"):
            f = figures[f"{how}_{c}"]
            lines.append(
                f"  {c:>2} conn {how:<6}  p50 {f['p50_ms']:.3f} ms  p99 {f['p99_ms']:.3f} ms  "
                f"{f['rps']:,.0f} req/s  ({f['n']} requests)  CPU/request: upstream "
                f"{f['upstream_cpu_us_per_request']:.0f} us, proxy {f['proxy_cpu_us_per_request']:.0f} us"
            )
        lines.append(f"  {c:>2} conn p50 overhead {overhead[c]:.3f} ms" + ("  (target <= 1 ms)" if c == 1 else ""))
    print("\n".join(lines))
    print(f"  -> {common.write('proxy', result)}")
    return result


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve-upstream"]:
        import trio

        trio.run(_serve_upstream)
    sys.exit(0 if main()["p50_overhead_ms_1"] <= 1.0 else 1)  # type: ignore[operator]
