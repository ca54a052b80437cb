"""kill -9 the real daemon 200 times at random moments while refresh tokens rotate (1 s tokens, so a
refresh is due every ~0.75 s); count lost logins. Issue 4's figure: zero lost logins over >= 200 kills.

Run with Keycloak's "Refresh Token Max Reuse" at 1 (covers a kill while the IdP's answer is in flight)
and at 0 (Keycloak's default: such a kill, a window of a few ms per refresh, is a lost login).

    python bench/crash.py [KILLS]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common

from tests.crash_daemon import run_crash_loop


def main() -> None:
    kills = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rows: dict[str, dict[str, object]] = {}
    for max_reuse in (1, 0):
        r = run_crash_loop(kills, max_reuse=max_reuse, seed=11)
        rows[f"max_reuse_{max_reuse}"] = {"kills": r.kills, "lost_logins": r.lost_logins, "seconds": r.seconds}
        print(
            f"kill -9 while rotating (refresh token max reuse {max_reuse}): {r.kills} kills, "
            f"{r.lost_logins} lost login(s), {r.seconds:.0f} s"
        )
    # the target holds where the broker can hold it: with Max Reuse 1 (at 0 a kill after the IdP rotated and
    # before its answer arrived loses the login, whatever the client does: a figure, not a target)
    lost = rows["max_reuse_1"]["lost_logins"]
    rows["verdicts"] = {
        "lost_logins": common.verdict("kill -9 while rotating, Max Reuse 1: lost logins", lost, "<=", 0, "")
    }
    common.show_verdicts(rows["verdicts"])
    print(f"  -> {common.write('crash', rows)}")


if __name__ == "__main__":
    main()
