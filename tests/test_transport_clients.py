"""The IdP transport's httpx clients when a tls_client_auth certificate is renewed on disk: the
client made for the renewed files takes the old one's place, and the old one (its connection pool)
is closed as soon as no request is in flight on it, never under one.

A real TLS server on loopback asks for the client certificate (as an IdP's mTLS endpoint does) and
counts the connections open at it: a superseded client left open keeps its kept connection there.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from dc_broker.idp import oidc
from dc_broker.idp.transport import ClientCert, IdpTransport
from tests.sockets import receive_head
from tests.test_client_auth_e2e import ClientCA
from tests.tls import make_tls

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@dataclass
class MtlsIdp:
    """Answers every request with 200 on a TLS connection that presented a client certificate the
    client CA signed; ``held`` connections' answers wait for ``gate``."""

    ca: str
    url: str
    clients: ClientCA
    open: int = 0
    #: the serial number of the certificate each connection (1-based, in order) presented
    presented: list[str] = field(default_factory=list)
    #: (connection, request number on it) of each request that came
    requests: list[tuple[int, int]] = field(default_factory=list)
    held: set[int] = field(default_factory=set)
    gate: trio.Event = field(default_factory=trio.Event)

    def cert(self, name: str = "client") -> ClientCert:
        """Issues (or renews, in place: written beside and renamed over, as cert-manager does) the
        certificate and key ``name``.pem / ``name``.key."""
        cert, key = self.clients.issue("dc-mtls", name=f"{name}.new")
        os.replace(cert, self.clients.tmp / f"{name}.pem")
        os.replace(key, self.clients.tmp / f"{name}.key")
        return ClientCert(str(self.clients.tmp / f"{name}.pem"), str(self.clients.tmp / f"{name}.key"))

    async def serve(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.open += 1
        try:
            await stream.do_handshake()
            self.presented.append(stream.getpeercert()["serialNumber"])
            c, n, buf = len(self.presented), 0, b""
            while (read := await receive_head(stream, buf)) is not None:
                _, buf = read  # the token request's small body comes with its head
                buf = b""
                n += 1
                self.requests.append((c, n))
                if c in self.held:
                    await self.gate.wait()
                await stream.send_all(OK)
        except trio.BrokenResourceError:
            pass
        finally:
            self.open -= 1
            await trio.aclose_forcefully(stream)

    async def until(self, done: Callable[[], bool]) -> None:
        with trio.fail_after(10):
            while not done():
                await trio.sleep(0.01)


@asynccontextmanager
async def mtls_idp(tmp_path: Path) -> AsyncIterator[MtlsIdp]:
    import ssl

    ca, server_cert, server_key = make_tls(tmp_path)
    clients = ClientCA(tmp_path / "clients")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server_cert, server_key)
    context.load_verify_locations(clients.path)
    context.verify_mode = ssl.CERT_REQUIRED
    async with trio.open_nursery() as nursery:
        idp = MtlsIdp(ca, "", clients)
        listeners = await nursery.start(
            partial(trio.serve_ssl_over_tcp, idp.serve, 0, context, host="127.0.0.1", https_compatible=True)
        )
        idp.url = f"https://127.0.0.1:{listeners[0].transport_listener.socket.getsockname()[1]}"
        yield idp
        nursery.cancel_scope.cancel()


def grant(idp: MtlsIdp) -> oidc.HttpRequest:
    return oidc.build_client_credentials(idp.url + "/token", oidc.ClientCredentials("dc-mtls", "tls_client_auth"))


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[httpx.AsyncClient]:
    """Every httpx client made during the test, in order."""
    clients: list[httpx.AsyncClient] = []

    class Recorded(httpx.AsyncClient):
        def __init__(self, **settings: Any) -> None:
            super().__init__(**settings)
            clients.append(self)

    monkeypatch.setattr(httpx, "AsyncClient", Recorded)
    return clients


def still_open(made: list[httpx.AsyncClient]) -> list[httpx.AsyncClient]:
    return [c for c in made if not c.is_closed]


async def test_a_renewed_certificate_closes_the_client_it_replaced(
    tmp_path: Path, made: list[httpx.AsyncClient]
) -> None:
    """Renewed five times between requests: each request presents the certificate as it is on disk,
    and only the newest client stays open (one connection at the IdP), not one pool per renewal."""
    async with mtls_idp(tmp_path) as idp:
        transport = IdpTransport()
        try:
            for i in range(6):
                cert = idp.cert()  # issued, then renewed
                assert (await transport.send(grant(idp), ca_bundle=idp.ca, client_cert=cert)).status == 200
                assert len(made) == i + 1 and still_open(made) == [made[-1]]
                await idp.until(lambda: idp.open == 1)
            assert len(set(idp.presented)) == 6  # one connection per certificate, each its own
        finally:
            await transport.aclose()
        assert still_open(made) == []


async def test_a_request_in_flight_on_the_replaced_client_ends_normally_and_then_it_is_closed(
    tmp_path: Path, made: list[httpx.AsyncClient]
) -> None:
    """The certificate is renewed while the IdP holds its answer to a request on the old client: a
    request after the renewal goes on a new client, and the held one is answered on its own
    connection; the old client is closed only then."""
    async with mtls_idp(tmp_path) as idp:
        transport = IdpTransport()
        cert = idp.cert()
        idp.held = {1}
        answers: list[oidc.HttpResponse] = []
        try:
            async with trio.open_nursery() as nursery:

                async def held() -> None:
                    answers.append(await transport.send(grant(idp), ca_bundle=idp.ca, client_cert=cert))

                nursery.start_soon(held)
                await idp.until(lambda: idp.requests == [(1, 1)])
                assert idp.cert() == cert  # renewed: the same files, new contents
                assert (await transport.send(grant(idp), ca_bundle=idp.ca, client_cert=cert)).status == 200
                old, new = made
                assert still_open(made) == [old, new] and idp.open == 2  # the held request is on the old one
                idp.gate.set()
            assert [a.status for a in answers] == [200]
            assert still_open(made) == [new]
            await idp.until(lambda: idp.open == 1)
            assert idp.requests == [(1, 1), (2, 1)] and len(set(idp.presented)) == 2
        finally:
            await transport.aclose()


async def test_a_request_that_waits_for_its_turn_with_the_old_client_is_sent_on_it(
    tmp_path: Path, made: list[httpx.AsyncClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that took the old client and waits for its turn at the IdP (``MAX_PER_ORIGIN``) when
    the certificate is renewed is in flight on it too: the old client is not closed under it."""
    from dc_broker.idp import transport as transport_module

    monkeypatch.setattr(transport_module, "MAX_PER_ORIGIN", 1)
    async with mtls_idp(tmp_path) as idp:
        transport = IdpTransport()
        cert = idp.cert()
        idp.held = {1}
        statuses: list[int] = []

        async def send() -> None:
            statuses.append((await transport.send(grant(idp), ca_bundle=idp.ca, client_cert=cert)).status)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                await idp.until(lambda: idp.requests == [(1, 1)])
                nursery.start_soon(send)  # takes the old client, waits behind the held request
                await trio.testing.wait_all_tasks_blocked()
                idp.cert()  # renewed
                nursery.start_soon(send)  # a new client; waits its turn too
                await trio.testing.wait_all_tasks_blocked()
                assert len(made) == 2 and still_open(made) == made
                idp.gate.set()
            assert statuses == [200, 200, 200] and still_open(made) == [made[1]]
            assert [c for c, _ in idp.requests] == [1, 1, 2]  # the one that waited went on the old connection
            await idp.until(lambda: idp.open == 1)
        finally:
            await transport.aclose()


async def test_profiles_with_certificates_of_their_own_keep_a_client_each(
    tmp_path: Path, made: list[httpx.AsyncClient]
) -> None:
    """Two certificates at one IdP (same CA bundle, no proxy): neither one's client replaces the
    other's, so requests alternating between them reuse both kept connections."""
    async with mtls_idp(tmp_path) as idp:
        transport = IdpTransport()
        first, second = idp.cert("first"), idp.cert("second")
        try:
            for _ in range(3):
                for cert in (first, second):
                    assert (await transport.send(grant(idp), ca_bundle=idp.ca, client_cert=cert)).status == 200
            assert len(made) == 2 and still_open(made) == made
            assert len(idp.presented) == 2 and idp.open == 2
        finally:
            await transport.aclose()
        assert still_open(made) == []
