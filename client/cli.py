"""``dc-token``: print a valid bearer token for a profile, and nothing else, on stdout.

    curl -H "Authorization: Bearer $(dc-token acme)" https://dc.example.com/dp/api/v1/...

Every failure is one line on stderr ("dc-token: <what is wrong>; <what to do>") and a distinct exit
status (``client.errors.EXIT_CODES``). Imports neither trio, httpx nor click: start-up time is most
of what this command costs, so it is kept to the standard library, msgpack and ``client.protocol``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from client.errors import EXIT_CODES, DcBrokerError

PROG = "dc-token"


def _parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Print a valid bearer token for PROFILE from the running dc-broker.",
        epilog=f"exit status:\n{codes}\n\nThe socket is $DC_BROKER_SOCKET or $XDG_RUNTIME_DIR/dc-broker/broker.sock.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("profile", metavar="PROFILE", help="profile name, as listed by `dc-broker status`")
    parser.add_argument(
        "--min-ttl",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="the token must stay valid at least this long (default 0)",
    )
    parser.add_argument(
        "--socket", metavar="PATH", help="broker socket (default: $DC_BROKER_SOCKET or the user default)"
    )
    return parser


def _fail(exc: DcBrokerError, profile: str) -> int:
    """One line: what is wrong, then what to do (unless the broker's message already says it)."""
    message = str(exc)
    hint = exc.hint.replace("PROFILE", profile)
    line = f"{PROG}: {message}" if not hint or "`" in message else f"{PROG}: {message}; {hint}"
    sys.stderr.write(line + "\n")
    return exc.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.min_ttl < 0 or args.min_ttl != args.min_ttl:
        sys.stderr.write(f"{PROG}: --min-ttl must be a number of seconds >= 0\n")
        return 2
    from client.sync import TokenClient

    try:
        with TokenClient(args.socket) as broker:
            token = broker.token(args.profile, min_ttl=args.min_ttl)
    except DcBrokerError as exc:
        return _fail(exc, args.profile)
    except KeyboardInterrupt:
        return 130
    sys.stdout.write(token + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
