"""Run inside the booted container, in the system unit's sandbox (as its ExecStartPost=) and outside
it for comparison: try what the hardening should refuse, print one ``PROBE {json}`` line.

Standard library only (it runs with the installed venv's interpreter); every attempt is recorded as
"ok" or the errno name, never raised, so the unit's start never fails because of the probe.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import pwd
import socket


def attempt(action: object) -> object:
    try:
        result = action()  # type: ignore[operator]
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ok" if result is None else result


def write(path: str) -> None:
    with open(path, "w") as f:
        f.write("probe")
    os.unlink(path)


def netlink() -> None:
    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()


def wx() -> None:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC).close()


def status(field: str) -> str:
    with open("/proc/self/status") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith(field + ":"))


report = {
    "user": pwd.getpwuid(os.getuid()).pw_name,
    "write_state": attempt(lambda: write("/var/lib/dc-broker/probe")),
    "write_opt": attempt(lambda: write("/opt/dc-broker/probe")),
    "write_var_tmp_outside": attempt(lambda: write("/var/cache/probe")),
    "home": attempt(lambda: sorted(os.listdir("/home"))),
    "setpriority": attempt(lambda: os.setpriority(os.PRIO_PROCESS, 0, 5)),
    "wx_mmap": attempt(wx),
    "af_netlink": attempt(netlink),
    "cap_eff": int(status("CapEff"), 16),
    "no_new_privs": int(status("NoNewPrivs")),
    "dev": sorted(os.listdir("/dev")),
}
print("PROBE " + json.dumps(report), flush=True)
