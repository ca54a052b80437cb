"""Side by side (issue 23): the broker against the floors it is held to, in one run, interleaved.

Every figure is measured against a yardstick in the same run, round after round (the order of the
servers rotates each round), so that a busy machine slows both alike; the ratios are what counts:

  cached token, one persistent connection     median round trip, this tree / trio echo        (target <= 1.1)
  cached token, a new connection per request  median connect+request+reply, this tree / oidc-agent  (<= 1.0)
  64 clients on persistent connections         requests/s, this tree / trio echo               (>= 0.9)
  64 clients, a new connection per request     connections/s, this tree / oidc-agent
  dc-token PROFILE, the whole process          median wall time / `python -S -c pass`, the same interpreter  (<= 1.5)
Every server figure is also given as a ratio to the raw echo floor.

The yardsticks:
  trio echo    bench/echo.py stream: a bare trio echo server as trio's docs write one (serve_listeners,
               SocketStream.receive_some / send_all), answering every frame at once with a fixed reply
               of the token reply's size (no msgpack, no checks, no deadlines, no identity)
  echo floor   bench/echo.py raw: the same with the broker's own non-blocking socket I/O: the floor a
               trio server can reach
  oidc-agent   the C peer (Debian's `oidc-agent-cli`), when installed: an account made by a scripted
               `oidc-gen` (password flow) against this tree's dev IdP on loopback, asked over its own
               IPC (one JSON request per connection, the way `oidc-token` asks); `oidc-token` is timed
               beside `dc-token`. Not installed: said, and its columns are left out.
  baseline     with ``--baseline DIR``, another checkout with its own .venv (e.g. main before a
               change: `git worktree add ../base main && make -C ../base lint`), served and timed
               the same way in the same rounds: before/after figures from one run.

The clients are the same for every server (blocking Unix sockets in this process; the 64-client loads
in a separate process with a selectors loop), so their own cost is in every figure alike.

    python bench/compare.py [--baseline DIR] [--rounds N]
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import multiprocessing as mp
import os
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common

from dc_token.protocol import Request, encode
from tests.e2e import stop, wait_for, wait_for_socket

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROFILE = "demo"
MIN_TTL = 60
TOKEN_FRAME = encode(Request(1, "token", {"profile": PROFILE, "min_ttl": MIN_TTL}))
OIDC_REQUEST = json.dumps({"request": "access_token", "account": PROFILE, "min_valid_period": MIN_TTL}).encode()
TARGETS = {
    "persistent_vs_echo": 1.1,
    "per_connection_vs_oidc_agent": 1.0,
    "rps_64_vs_echo": 0.9,
    "dc_token_vs_floor": 1.5,
}
ECHO = "trio echo"
FLOOR = "echo floor"


class Server:
    """One server under test: a name, its socket, the request it is sent, and how a reply ends."""

    def __init__(self, name: str, path: str, request: bytes, *, framed: bool = True, persistent: bool = True):
        self.name = name
        self.path = path
        self.request = request
        #: replies are length-framed (dc-broker, echo); else the server closes after one reply (oidc-agent)
        self.framed = framed
        #: more than one request per connection
        self.persistent = persistent


# ------------------------------------------------------------------ clients (the same for every server)


def _read_reply(sock: socket.socket, framed: bool) -> int:
    if not framed:  # oidc-agent: one JSON reply, then it closes
        total = 0
        while chunk := sock.recv(65536):
            total += len(chunk)
        return total
    buf = sock.recv(65536)
    while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("the server closed the connection mid-reply")
        buf += more
    return len(buf)


def persistent_round_trips(server: Server, n: int) -> list[float]:
    s = socket.socket(socket.AF_UNIX)
    s.connect(server.path)
    out = []
    perf = time.perf_counter
    try:
        for _ in range(n):
            t0 = perf()
            s.sendall(server.request)
            _read_reply(s, True)
            out.append(perf() - t0)
    finally:
        s.close()
    return out


def per_connection_round_trips(server: Server, n: int) -> list[float]:
    out = []
    perf = time.perf_counter
    for _ in range(n):
        t0 = perf()
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(server.path)
            s.sendall(server.request)
            _read_reply(s, server.framed)
        finally:
            s.close()
        out.append(perf() - t0)
    return out


def _load(path: str, request: bytes, framed: bool, persistent: bool, clients: int, seconds: float, q: mp.Queue) -> None:  # type: ignore[type-arg]
    """A closed loop of ``clients`` requests in flight, each on its own connection; a new connection
    per request unless ``persistent``. Puts requests/s."""
    sel = selectors.DefaultSelector()
    bufs: dict[socket.socket, bytes] = {}

    def open_one() -> None:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        bufs[s] = b""
        s.send(request)

    for _ in range(clients):
        open_one()
    done = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data = b""
            if not framed:
                if data:
                    continue  # oidc-agent: the reply ends when it closes
                sel.unregister(s)
                s.close()
                del bufs[s]
                done += 1
                open_one()
                continue
            buf = bufs[s] + data
            while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                buf = buf[4 + int.from_bytes(buf[:4], "big") :]
                done += 1
                if persistent:
                    s.send(request)
                else:
                    sel.unregister(s)
                    s.close()
                    open_one()
                    break
            if s in bufs:
                bufs[s] = buf
    elapsed = time.perf_counter() - start
    for s in bufs:
        s.close()
    q.put(done / elapsed)


def throughput(server: Server, clients: int, seconds: float, *, persistent: bool) -> float:
    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    p = mp.Process(target=_load, args=(server.path, server.request, server.framed, persistent, clients, seconds, q))
    p.start()
    rate = q.get(timeout=seconds + 60)
    p.join()
    return float(rate)


def wall(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


# ------------------------------------------------------------------ the servers


@contextlib.contextmanager
def dev_broker(bin_dir: Path, tmp: Path, name: str) -> Iterator[tuple[str, str]]:
    """`dc-broker dev` from ``bin_dir`` on a socket in ``tmp``; yields (socket, IdP base URL)."""
    sock = str(tmp / f"{name}.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DC_BROKER_")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [str(bin_dir / "dc-broker"), "dev", "--socket", sock],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        wait_for_socket(sock, proc, timeout=60)
        assert proc.stdout is not None
        base = ""
        for line in proc.stdout:
            found = re.search(r"dev IdP:\s+(http://\S+)/realms/demo", line)
            if found:
                base = found.group(1)
                break
        assert base, f"{bin_dir / 'dc-broker'} dev did not print its IdP's URL"
        yield sock, base
    finally:
        stop(proc)


@contextlib.contextmanager
def echo_server(tmp: Path, mode: str, reply_bytes: int) -> Iterator[str]:
    sock = str(tmp / f"echo-{mode}.sock")
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "echo.py"), mode, sock, str(reply_bytes)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)


class OidcAgent:
    """oidc-agent with one account, ``demo``, made by oidc-gen against ``issuer`` (password flow)."""

    def __init__(self, tmp: Path, issuer: str) -> None:
        self.home = tmp / "oidc-home"
        self.home.mkdir()
        self.socket = str(tmp / "oidc-agent.sock")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OIDC")},
            "HOME": str(self.home),
            "OIDC_CONFIG_DIR": str(self.home / ".oidc-agent"),
            "OIDC_SOCK": self.socket,
            "OIDC_ENCRYPTION_PW": "bench-only-passphrase",
        }
        started = subprocess.run(
            ["oidc-agent", "--json", "--quiet", f"--socket-path={self.socket}"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if started.returncode != 0:
            raise RuntimeError(f"oidc-agent did not start: {started.stderr.strip() or started.stdout.strip()}")
        self.pid = int(json.loads(started.stdout)["dpid"])
        try:
            made = subprocess.run(
                [
                    "oidc-gen",
                    f"--issuer={issuer}",
                    "--client-id=dc-cli",
                    "--client-secret=dc-cli-secret",
                    "--flow=password",
                    "--op-username=demo",
                    "--op-password=demo",
                    "--scope=openid",
                    "--pw-env",
                    "--confirm-default",
                    "--prompt=none",
                    PROFILE,
                ],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            if made.returncode != 0:
                raise RuntimeError(f"oidc-gen failed: {(made.stderr or made.stdout).strip()[-300:]}")
            wait_for(self.answers, 20, "oidc-agent serving the demo account")
        except BaseException:
            self.close()
            raise

    def answers(self) -> bool:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(self.socket)
            s.sendall(OIDC_REQUEST)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
            return json.loads(reply).get("status") == "success"
        except (OSError, ValueError):
            return False
        finally:
            s.close()

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, 15)


def find_oidc_agent() -> str | None:
    """Why oidc-agent cannot be compared here, or None when it can."""
    missing = [tool for tool in ("oidc-agent", "oidc-gen", "oidc-token") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (Debian: apt-get install oidc-agent-cli)"
    return None


# ------------------------------------------------------------------ the run


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class Figures:
    """Samples per (figure, server), pooled over rounds, and each round's ratio to the yardstick."""

    def __init__(self) -> None:
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.round_ratios: dict[str, dict[str, list[float]]] = {}

    def add(self, figure: str, server: str, xs: list[float]) -> None:
        self.samples.setdefault(figure, {}).setdefault(server, []).extend(xs)

    def add_round(self, figure: str, per_server: dict[str, float], yardstick: str) -> None:
        base = per_server.get(yardstick)
        if not base:
            return
        for name, value in per_server.items():
            if name != yardstick:
                self.round_ratios.setdefault(figure, {}).setdefault(name, []).append(value / base)

    def median(self, figure: str, server: str) -> float:
        return _median(self.samples.get(figure, {}).get(server, []))


def run(baseline: Path | None, rounds: int) -> dict[str, object]:
    for tree in filter(None, (ROOT, baseline)):
        # an installed package has its bytecode; PYTHONDONTWRITEBYTECODE would make every dc-token run
        # compile its modules again and measure the compiler
        for part in ("client", "broker"):
            compileall.compile_dir(str(tree / part), quiet=1)
    trees = {"this tree": Path(sys.executable).parent}
    if baseline is not None:
        trees["baseline"] = baseline / ".venv" / "bin"
        if not (trees["baseline"] / "dc-broker").exists():
            raise SystemExit(f"--baseline {baseline}: no .venv/bin/dc-broker there (run `make lint` in it)")
    skipped = find_oidc_agent()
    figures = Figures()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dc-compare-")))
        servers: list[Server] = []
        idp = ""
        for name, bin_dir in trees.items():
            sock, base = stack.enter_context(dev_broker(bin_dir, tmp, name.replace(" ", "-")))
            idp = idp or base
            servers.append(Server(name, sock, TOKEN_FRAME))
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(servers[0].path)
        probe.sendall(TOKEN_FRAME)
        reply_bytes = _read_reply(probe, True)
        probe.close()
        servers.append(Server(ECHO, stack.enter_context(echo_server(tmp, "stream", reply_bytes)), TOKEN_FRAME))
        servers.append(Server(FLOOR, stack.enter_context(echo_server(tmp, "raw", reply_bytes)), TOKEN_FRAME))
        oidc: OidcAgent | None = None
        if skipped is None:
            try:
                oidc = OidcAgent(tmp, f"{idp}/realms/demo")
                stack.callback(oidc.close)
                servers.append(Server("oidc-agent", oidc.socket, OIDC_REQUEST, framed=False, persistent=False))
            except (RuntimeError, AssertionError, OSError, subprocess.SubprocessError) as exc:
                skipped = str(exc)
        if skipped:
            print(f"oidc-agent: skipped ({skipped})", flush=True)
        commands = _commands(trees, servers, oidc)
        for r in range(rounds):
            order = servers[r % len(servers) :] + servers[: r % len(servers)]
            _round(figures, order, commands, r)
            print(f"  round {r + 1}/{rounds} done", flush=True)
    return _report(figures, [s.name for s in servers], skipped, rounds, baseline)


def _commands(
    trees: dict[str, Path], servers: list[Server], oidc: OidcAgent | None
) -> dict[str, tuple[list[str], dict[str, str]]]:
    """The whole-process commands: each tree's dc-token against its own broker, its interpreter's floor."""
    by_name = {s.name: s for s in servers}
    out: dict[str, tuple[list[str], dict[str, str]]] = {}
    for name, bin_dir in trees.items():
        env = {**os.environ, "DC_BROKER_SOCKET": by_name[name].path}
        out[f"dc-token ({name})"] = ([str(bin_dir / "dc-token"), PROFILE], env)
    python = str(trees["this tree"] / "python")
    out["python -S -c pass"] = ([python, "-S", "-c", "pass"], dict(os.environ))
    out["python -c pass"] = ([python, "-c", "pass"], dict(os.environ))
    if oidc is not None:
        out["oidc-token"] = (["oidc-token", PROFILE], oidc.env)
    return out


#: each server figure's yardstick (the raw echo floor is shown beside every one)
YARDSTICKS = {"persistent": ECHO, "per_connection": "oidc-agent", "rps_64": ECHO, "cps_64": "oidc-agent"}
PERSISTENT_N = 2000
PER_CONNECTION_N = 300
LOAD_SECONDS = 1.5
WALL_RUNS = 6


def _round(
    figures: Figures, order: list[Server], commands: dict[str, tuple[list[str], dict[str, str]]], r: int
) -> None:
    per: dict[str, dict[str, float]] = {"persistent": {}, "per_connection": {}, "rps_64": {}, "cps_64": {}}
    for server in order:
        if server.persistent:
            xs = persistent_round_trips(server, PERSISTENT_N)[PERSISTENT_N // 10 :]  # after a warm-up
            figures.add("persistent", server.name, xs)
            per["persistent"][server.name] = _median(xs)
        xs = per_connection_round_trips(server, PER_CONNECTION_N)[PER_CONNECTION_N // 10 :]
        figures.add("per_connection", server.name, xs)
        per["per_connection"][server.name] = _median(xs)
    for server in order:
        if server.persistent:
            rate = throughput(server, 64, LOAD_SECONDS, persistent=True)
            figures.add("rps_64", server.name, [rate])
            per["rps_64"][server.name] = rate
        rate = throughput(server, 64, LOAD_SECONDS, persistent=False)
        figures.add("cps_64", server.name, [rate])
        per["cps_64"][server.name] = rate
    for key, yardstick in YARDSTICKS.items():
        figures.add_round(key, per[key], yardstick)
    names = list(commands)
    names = names[r % len(names) :] + names[: r % len(names)]
    walls: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(WALL_RUNS):
        for name in names:
            cmd, env = commands[name]
            walls[name].append(wall(cmd, env))
    for name, xs in walls.items():
        figures.add("wall", name, xs)
    figures.add_round("wall", {k: _median(v) for k, v in walls.items()}, "python -S -c pass")


def _spread(xs: list[float]) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}" if xs else "-"


ROWS: list[tuple[str, str, Callable[[float], str]]] = [
    ("persistent", "cached token, one persistent connection", lambda v: f"{v * 1e6:8.1f} us"),
    ("per_connection", "cached token, a new connection per request", lambda v: f"{v * 1e6:8.1f} us"),
    ("rps_64", "64 clients, persistent connections", lambda v: f"{v:8,.0f} /s"),
    ("cps_64", "64 clients, a new connection per request", lambda v: f"{v:8,.0f} /s"),
]


def _report(
    figures: Figures, names: list[str], skipped: str | None, rounds: int, baseline: Path | None
) -> dict[str, object]:
    result: dict[str, object] = {"rounds": rounds, "baseline": str(baseline) if baseline else None}
    if skipped:
        result["oidc_agent_skipped"] = skipped
    print(f"\nside by side, {rounds} interleaved rounds (medians); ratio = median / a yardstick's (range over rounds)")
    print(f"{'':44}" + "".join(f"{n:>13}" for n in names))
    for key, title, fmt in ROWS:
        values = {n: figures.median(key, n) for n in names}
        print(f"{title:44}" + "".join(f"{fmt(v) if v == v else '-':>13}" for v in values.values()))
        ratios: dict[str, dict[str, float]] = {}
        for yardstick in dict.fromkeys((YARDSTICKS[key], FLOOR)):
            base = values.get(yardstick, float("nan"))
            if base != base:
                continue
            per_round = figures.round_ratios.get(key, {}) if yardstick == YARDSTICKS[key] else {}
            for n in names:
                if n == yardstick or values[n] != values[n] or n in (ECHO, FLOOR):
                    continue
                ratio = values[n] / base
                ratios.setdefault(yardstick, {})[n] = ratio
                spread = f" (rounds {_spread(per_round[n])})" if n in per_round else ""
                print(f"{'':6}{n} / {yardstick}: {ratio:.2f}x{spread}")
        result[key] = {"median": {n: v for n, v in values.items() if v == v}, "ratios": ratios}
    print("\nwhole process, median wall time (ratio to `python -S -c pass`, the same interpreter)")
    wall_ratios = figures.round_ratios.get("wall", {})
    floor = figures.median("wall", "python -S -c pass")
    walls: dict[str, object] = {}
    for name, xs in figures.samples.get("wall", {}).items():
        value = _median(xs)
        walls[name] = value
        spread = f"   {value / floor:.2f}x (rounds {_spread(wall_ratios.get(name, []))})"
        print(f"  {name:34}{value * 1e3:8.2f} ms{spread if name != 'python -S -c pass' else ''}")
    result["wall"] = walls
    verdicts = _verdicts(figures)
    result["verdicts"] = verdicts
    print("\ntargets (this tree):")
    common.show_verdicts(verdicts)
    return result


def _verdicts(figures: Figures) -> dict[str, dict[str, object]]:
    me = "this tree"

    def ratio(key: str, yardstick: str) -> float | None:
        a, b = figures.median(key, me), figures.median(key, yardstick)
        return a / b if a == a and b == b and b else None

    floor = figures.median("wall", "python -S -c pass") if figures.samples.get("wall") else float("nan")
    checks = {
        "persistent_vs_echo": (ratio("persistent", ECHO), f"persistent round trip / {ECHO}", "<="),
        "per_connection_vs_oidc_agent": (
            ratio("per_connection", "oidc-agent"),
            "new connection per request / oidc-agent",
            "<=",
        ),
        "rps_64_vs_echo": (ratio("rps_64", ECHO), f"64-client throughput / {ECHO}", ">="),
        "dc_token_vs_floor": (
            figures.median("wall", f"dc-token ({me})") / floor if floor == floor else None,
            "dc-token whole process / python -S -c pass",
            "<=",
        ),
    }
    return {key: common.verdict(what, value, sense, TARGETS[key]) for key, (value, what, sense) in checks.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout with its own .venv, measured beside this one")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = run(args.baseline.resolve() if args.baseline else None, args.rounds)
    print(f"  -> {common.write('compare', result)}")


if __name__ == "__main__":
    main()
