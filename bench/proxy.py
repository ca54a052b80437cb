"""`dc-broker proxy` overhead: the same small GET against the same local upstream, direct and through
the proxy; latency (p50, p99) and requests/s at 1 and 16 keep-alive connections, and at one new
connection per request (what the caller check costs: sock_diag and the holder check).

Target (issues 15, 21): p50 overhead per request <= 1 ms. The upstream is a minimal h11-on-trio
server in this file (the lightest honest upstream, so the overhead is the proxy's); the proxy a real
`dc-broker proxy` process in front of a `dc-broker dev` broker; the load generator a separate
process: a selectors loop over raw sockets with a pre-encoded request (closed loop, one request in
flight per connection), timing each response. Latency on a shared machine follows its load, so the
CPU time each process spends per request (utime + stime from /proc/PID/stat) is printed too.

The proxy asks the broker for every request's token (issue 21: the broker's word is final); that
ask alone is measured too (``dc_broker.proxy.broker.BrokerTokens``, in a trio loop), beside the
blocking client's round trip (``TokenClient(cache=False)``) as the baseline of the same run.

``--before DIR``: also run the proxy from another source tree (a checkout of an earlier commit,
``git archive COMMIT | tar -x -C DIR``), interleaved with this one, so before and after are
measured in the same run on the same load.

    python bench/proxy.py [--seconds S] [--before DIR]
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
from contextlib import ExitStack, contextmanager
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


def load_fresh(address: str, seconds: float, token: str | None, q: mp.Queue) -> None:  # type: ignore[type-arg]
    """One request per new connection, one at a time: connect, send, read the answer, close."""
    host, port = address.rsplit(":", 1)
    frame = _request(address, token)
    latencies: list[float] = []
    start = time.perf_counter()
    end, warm = start + seconds, start + min(1.0, seconds / 4)
    while (now := time.perf_counter()) < end:
        with socket.create_connection((host, int(port))) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(frame)
            buf = b""
            while not _complete(buf):
                data = s.recv(65536)
                if not data:
                    raise SystemExit(f"{address} closed a connection before answering: {buf[:200]!r}")
                buf += data
        if now >= warm:
            latencies.append(time.perf_counter() - now)
    q.put((latencies, len(latencies) / (time.perf_counter() - warm)))


def load(address: str, connections: int, seconds: float, token: str | None, q: mp.Queue) -> None:  # type: ignore[type-arg]
    if connections == 0:
        return load_fresh(address, seconds, token, q)
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


def broker_asks(sock: str, n: int) -> dict[str, dict[str, float]]:
    """Seconds per token ask: the proxy's (``BrokerTokens``, trio) and the blocking client's."""
    import trio

    from dc_broker.proxy.broker import BrokerTokens

    async def proxy_asks() -> list[float]:
        tokens = BrokerTokens(sock, "demo")
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await tokens.token(30.0)
            times.append(time.perf_counter() - t)
        tokens.close()
        return times

    with TokenClient(sock, cache=False) as client:
        blocking = []
        for _ in range(n):
            t = time.perf_counter()
            client.token("demo", min_ttl=30)
            blocking.append(time.perf_counter() - t)
    return {"proxy_ask": common.summary_us(trio.run(proxy_asks)), "blocking_client": common.summary_us(blocking)}


@contextmanager
def proxy_process(sock: str, upstream: str, source: str | None) -> Iterator[tuple[str, int]]:
    """A `dc-broker proxy` (from ``source``, another tree's broker/ and client/, if given): its
    address and pid."""
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(str(Path(source) / part) for part in ("broker", "client"))
    proc = subprocess.Popen(
        [DC_BROKER, "proxy", "demo", "--socket", sock, "--upstream", upstream, "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        m = re.search(r"http://(\S+) ->", proc.stdout.readline())
        assert m, "the proxy did not start"
        yield m.group(1), proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


CONNECTIONS = {"1": 1, "16": 16, "fresh": 0}  # fresh: a new connection for every request


def main() -> dict[str, object]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--before", default=None, help="another source tree whose proxy is measured too")
    args = parser.parse_args()
    hows = ["proxy"] + (["before"] if args.before else [])
    figures: dict[str, dict[str, float]] = {}
    with common.dev() as (sock, _), upstream_process() as (upstream, upstream_pid), ExitStack() as stack:
        direct = urlsplit(upstream).netloc
        proxies = {
            how: stack.enter_context(proxy_process(sock, upstream, args.before if how == "before" else None))
            for how in hows
        }
        with TokenClient(sock) as broker:
            token = broker.token("demo")
        pids = {"upstream": upstream_pid, **{how: pid for how, (_, pid) in proxies.items()}}
        measure(direct, 4, 2.0, pids, token)  # warm every process up (imports, first connections)
        for addr, _ in proxies.values():
            measure(addr, 4, 2.0, pids)
        for name, connections in CONNECTIONS.items():
            figures[f"direct_{name}"] = measure(direct, connections, args.seconds, pids, token)
            for how, (addr, _) in proxies.items():
                figures[f"{how}_{name}"] = measure(addr, connections, args.seconds, pids)
        asks = broker_asks(sock, 3000)
    overhead = {
        f"{how}_{name}": figures[f"{how}_{name}"]["p50_ms"] - figures[f"direct_{name}"]["p50_ms"]
        for how in hows
        for name in CONNECTIONS
    }
    result = {
        **figures,
        **{f"p50_overhead_ms_{key}": value for key, value in overhead.items()},
        "broker_ask": asks,
        "p50_overhead_ms_1": overhead["proxy_1"],
        "target": {"p50_overhead_ms_1": 1.0},
        "verdicts": {
            "p50_overhead_ms_1": common.verdict(
                "proxy: p50 overhead at 1 connection", overhead["proxy_1"], "<=", 1.0, "ms"
            )
        },
    }
    lines = [f"GET {PATH} against a local upstream, direct vs through `dc-broker proxy` (closed loop):"]
    for name in CONNECTIONS:
        label = "new conn/req" if name == "fresh" else f"{name:>2} conn"
        for how in ("direct", *hows):
            f = figures[f"{how}_{name}"]
            cpu = "".join(f", {p} {f[f'{p}_cpu_us_per_request']:.0f} us" for p in hows if how in ("direct", p))
            lines.append(
                f"  {label} {how:<6}  p50 {f['p50_ms']:.3f} ms  p99 {f['p99_ms']:.3f} ms  "
                f"{f['rps']:,.0f} req/s  ({f['n']} requests)  CPU/request: upstream "
                f"{f['upstream_cpu_us_per_request']:.0f} us{cpu}"
            )
        for how in hows:
            lines.append(f"  {label} p50 overhead ({how}) {overhead[f'{how}_{name}']:.3f} ms")
    p, b = asks["proxy_ask"], asks["blocking_client"]
    lines.append(
        f"  broker ask per request: median {p['median_us']:.0f} us, p99 {p['p99_us']:.0f} us "
        f"(blocking TokenClient round trip: median {b['median_us']:.0f} us; "
        f"ratio {p['median_us'] / b['median_us']:.2f})"
    )
    lines.append(f"  {result['verdicts']['p50_overhead_ms_1']['line']}")
    print("\n".join(lines))
    print(f"  -> {common.write('proxy', result)}")
    return result


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve-upstream"]:
        import trio

        trio.run(_serve_upstream)
    sys.exit(0 if main()["p50_overhead_ms_1"] <= 1.0 else 1)  # type: ignore[operator]
