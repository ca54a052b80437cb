"""Keycloak-compatible development IdP + demo API, served over real HTTP by hypercorn under trio.

The public entry point for ``dc-broker dev``, ``make demo`` and the test suite:

    idp = DevIdP([demo_realm(access_lifespan=5)], clock=fake_clock)
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(serve, idp)      # e.g. "http://127.0.0.1:43117"
        ...                                             # issuer: f"{base_url}/realms/demo"
        nursery.cancel_scope.cancel()                   # "connection refused" from here on

or in-process without sockets: ``httpx.AsyncClient(transport=httpx.ASGITransport(app=idp.app))``.

``python -m dc_broker.devserver [--host H] [--port P] [--access-lifespan S] [--sso-idle S] [--sso-max S]
[--rotate] [--max-reuse N] [--device-interval S] [--refresh-token-answer new|same|none]
[--dead-refresh-error invalid_grant|invalid_request] [--no-refresh-expires-in] [--no-expires-in]
[--refresh-scope narrow|ignore] [--set KEY=VALUE]... [--client-set CLIENT.KEY=VALUE]...
[--certfile PEM --keyfile PEM [--client-ca PEM]] [--refusal-body json|empty|html]
[--echo-description] [--expires-in RAW] [--drip S] [--latency S]`` runs the demo realm (over https
with ``--certfile``). The last five are the standing fault modes of ``dc_broker.devidp.faults``; the
five before the certificate are other OPs' personalities (``DevRealm``'s docstring);
``--device-interval`` is the device flow's polling interval, Keycloak's default 5 s, which end-to-end
tests shorten. It prints the base URL as the first stdout line and serves until SIGINT/SIGTERM (exit 0).

The logic lives in the ``dc_broker.devidp`` package (see its docstring for the module map). This module
owns only the public names, ``serve()`` and the command line. It never logs secrets: hypercorn's
access log is off and its error log is limited to warnings.
"""

from __future__ import annotations

import argparse
import signal
import ssl
import sys
from collections.abc import Sequence
from dataclasses import fields
from functools import partial
from typing import cast

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import ASGIFramework

from dc_broker.devidp.clientauth import PEER_CERTIFICATE
from dc_broker.devidp.faults import Faults
from dc_broker.devidp.idp import DevIdP
from dc_broker.devidp.realm import DevClient, DevRealm, DevUser, demo_realm
from dc_broker.devidp.state import Stats

__all__ = ["DevClient", "DevIdP", "DevRealm", "DevUser", "Faults", "Stats", "demo_realm", "main", "serve"]


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class _PeerCertificateSSLObject(ssl.SSLObject):
    """The server side of one TLS connection that, once its handshake is done, records the client's
    certificate (DER) in ``PEER_CERTIFICATE``. hypercorn does the handshake in the connection's own
    task and starts the app's tasks from it, and trio gives a task a copy of its spawner's context:
    so the app, and only this connection's requests, see it."""

    def do_handshake(self) -> None:
        super().do_handshake()
        PEER_CERTIFICATE.set(self.getpeercert(binary_form=True))


class _ClientCertConfig(Config):
    """hypercorn's config whose TLS asks for a client certificate (verified against ``ca_certs``,
    optional: a client without one still connects, and the token endpoint refuses it)."""

    def create_ssl_context(self) -> ssl.SSLContext | None:
        context = super().create_ssl_context()
        if context is not None:
            context.sslobject_class = _PeerCertificateSSLObject
        return context


async def serve(
    idp: DevIdP,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    certfile: str | None = None,
    keyfile: str | None = None,
    client_ca: str | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``idp.app`` on ``host:port`` (0 = a free port) until cancelled; https with ``certfile``;
    with ``client_ca`` the TLS handshake asks for a client certificate issued by that CA, which the
    token endpoint's X509 authenticator reads (RFC 8705 ``tls_client_auth``).

    Calls ``task_status.started(base_url)`` (e.g. ``"http://127.0.0.1:43117"``) once the socket is
    listening. Cancelling the surrounding scope closes the listener and in-flight requests.
    """
    config = _ClientCertConfig()
    config.bind = [_bind(host, port)]
    if certfile is not None:
        config.certfile, config.keyfile = certfile, keyfile
    if client_ca is not None:
        config.ca_certs = client_ca
        config.verify_mode = ssl.CERT_OPTIONAL
    config.loglevel = "WARNING"
    config.accesslog = None
    config.graceful_timeout = 1.0
    app = cast(ASGIFramework, idp.app)  # Starlette is ASGI; the two libraries spell the types apart
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(partial(hypercorn_serve, app, config, mode="asgi"))
        task_status.started(binds[0].replace("http://", "https://", 1) if certfile else binds[0])


def _whole_seconds(text: str) -> int:
    if not text.isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds, 1 or more")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dc_broker.devserver",
        description="Run the dev IdP with the demo realm; print the base URL as the first line on stdout.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default 0: a free port)")
    parser.add_argument("--access-lifespan", type=float, default=None, help="access token lifespan, seconds")
    parser.add_argument("--sso-idle", type=float, default=None, help="SSO Session Idle, seconds")
    parser.add_argument("--sso-max", type=float, default=None, help="SSO Session Max, seconds")
    parser.add_argument("--rotate", action="store_true", help="rotate refresh tokens (reuse kills the session)")
    parser.add_argument(
        "--max-reuse",
        type=int,
        default=None,
        help="with --rotate: times a refresh token may be reused (Keycloak's default 0)",
    )
    parser.add_argument(
        "--device-interval",
        type=_whole_seconds,
        default=None,
        help="device flow: seconds a client must wait between polls (default 5, as Keycloak)",
    )
    parser.add_argument(
        "--refresh-token-answer",
        choices=["new", "same", "none"],
        default=None,
        help="a refresh answer's refresh_token: new (Keycloak), same (the presented one), none (LemonLDAP::NG)",
    )
    parser.add_argument(
        "--dead-refresh-error",
        choices=["invalid_grant", "invalid_request"],
        default=None,
        help="the error a dead refresh token gets (default invalid_grant, as Keycloak)",
    )
    parser.add_argument(
        "--no-refresh-expires-in", action="store_true", help="answers carry no refresh_expires_in (most OPs)"
    )
    parser.add_argument(
        "--no-expires-in", action="store_true", help="answers carry no expires_in (the JWT's exp tells)"
    )
    parser.add_argument(
        "--refresh-scope",
        choices=["narrow", "ignore"],
        default=None,
        help="a scope asked on refresh: narrow (Keycloak 23+) or ignore (RH-SSO 7.6: the full original scope)",
    )
    parser.add_argument(
        "--refusal-body",
        choices=["json", "empty", "html"],
        default="json",
        help="how 400/401/403 token errors are rendered (default json, as Keycloak)",
    )
    parser.add_argument(
        "--echo-description", action="store_true", help="error_description echoes the request body (and pads it)"
    )
    parser.add_argument("--expires-in", default=None, help='raw JSON for expires_in ("NaN", "1e999", ...) or "absent"')
    parser.add_argument("--drip", type=float, default=0.0, help="send token responses one byte per DRIP seconds")
    parser.add_argument("--latency", type=float, default=0.0, help="every token request waits LATENCY seconds first")
    parser.add_argument(
        "--set",
        dest="realm_settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any realm setting of DevRealm (brute_force=true, failure_factor=1, ssl_required=all, enabled=false, "
        "revoke_scope=user ...); repeatable",
    )
    parser.add_argument(
        "--client-set",
        dest="client_settings",
        action="append",
        default=[],
        metavar="CLIENT.KEY=VALUE",
        help="a setting of one of the demo realm's clients (dc-cli.device_grant=false, dc-service.dpop=required, "
        "dc-service.service_account_enabled=false ...); repeatable",
    )
    parser.add_argument("--certfile", default=None, help="serve https with this certificate (PEM)")
    parser.add_argument("--keyfile", default=None, help="the certificate's private key (PEM)")
    parser.add_argument(
        "--client-ca", default=None, help="with --certfile: ask TLS clients for a certificate from this CA (mTLS)"
    )
    return parser


def faults_from_args(idp: DevIdP, args: argparse.Namespace) -> None:
    faults = idp.faults
    faults.refusal_body = args.refusal_body
    faults.echo_description = args.echo_description
    faults.expires_in = args.expires_in
    faults.drip = args.drip
    faults.latency = args.latency


def realm_from_args(args: argparse.Namespace) -> DevRealm:
    overrides: dict[str, object] = {
        name: value
        for name, value in (
            ("access_lifespan", args.access_lifespan),
            ("sso_idle", args.sso_idle),
            ("sso_max", args.sso_max),
            ("device_interval", args.device_interval),
            ("refresh_token_answer", args.refresh_token_answer),
            ("dead_refresh_error", args.dead_refresh_error),
            ("refresh_scope", args.refresh_scope),
        )
        if value is not None
    }
    if args.rotate:
        overrides["rotate_refresh_tokens"] = True
    if args.max_reuse is not None:
        overrides["refresh_token_max_reuse"] = args.max_reuse
    if args.no_refresh_expires_in:
        overrides["send_refresh_expires_in"] = False
    if args.no_expires_in:
        overrides["send_expires_in"] = False
    for setting in args.realm_settings:
        key, value = _setting(setting)
        overrides[key] = _typed(DevRealm, key, value)
    realm = demo_realm(**overrides)
    for setting in args.client_settings:
        name, value = _setting(setting)
        client_id, _, key = name.rpartition(".")
        client = realm.client(client_id)
        if client is None:
            raise SystemExit(f"--client-set {setting}: no client {client_id!r} in the demo realm")
        setattr(client, key, _typed(DevClient, key, value))
    return realm


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"{text!r} is not KEY=VALUE")
    return key.strip(), value.strip()


def _typed(kind: type, key: str, value: str) -> object:
    """``value`` as the field ``key`` of the dataclass ``kind`` takes it (bool, int, float or str)."""
    types = {f.name: str(f.type) for f in fields(kind)}
    if key not in types:
        raise SystemExit(f"{kind.__name__} has no setting {key!r} (it has: {', '.join(sorted(types))})")
    shown = types[key]
    if shown.startswith("bool"):
        if value.lower() not in ("true", "false", "1", "0", "on", "off"):
            raise SystemExit(f"{key}={value}: say true or false")
        return value.lower() in ("true", "1", "on")
    if shown.startswith("int"):
        return int(value)
    if shown.startswith("float"):
        return float(value)
    return value


async def _run(idp: DevIdP, args: argparse.Namespace) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            where = {
                "host": args.host,
                "port": args.port,
                "certfile": args.certfile,
                "keyfile": args.keyfile,
                "client_ca": args.client_ca,
            }
            base_url = await nursery.start(partial(serve, idp, **where))
            print(base_url, flush=True)
            print(
                f"realm demo: {base_url}/realms/demo (legacy: {base_url}/auth/realms/demo); "
                f"demo API: {base_url}/dp/api/v1/aiconnections/types",
                file=sys.stderr,
                flush=True,
            )
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    idp = DevIdP([realm_from_args(args)])
    faults_from_args(idp, args)
    if (args.certfile is None) != (args.keyfile is None):
        _parser().error("--certfile and --keyfile go together")
    trio.run(_run, idp, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
