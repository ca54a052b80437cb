"""The IdP transport: the one place that sends an ``HttpRequest`` (``dc_broker.idp.oidc``) over the
network and returns an ``HttpResponse``. httpx under bounded timeouts (a total deadline too, so a
server that drips its answer cannot hold a refresh for ever), TLS verification on (optionally a
per-profile CA bundle), no redirects; the HTTP proxy that ``dc_broker.idp.proxies`` picks from the
profile's ``proxy`` setting or the standard variables (read once, when the transport is made: nothing
else of httpx's ``trust_env`` applies, no ``.netrc``, no ``SSL_CERT_FILE``). Every httpx failure
becomes ``UpstreamTransient`` here, naming the proxy it went through, so nothing above it sees an
httpx exception.

A token grant (``HttpRequest.patient``) is read patiently (``Timeouts.patient_read`` /
``patient_total``): once it is sent, the IdP acts on it (a new login, a rotated refresh token), and a
30 s stall of the IdP must not make the broker walk away from an answer that holds the only copy of
the next refresh token, nor send a password grant again and again to an IdP that takes 30 s to log
anyone in. If the answer to a request that spends a single-use credential (``HttpRequest.spends``:
a refresh token Keycloak may rotate) is lost anyway after it went out, the failure is ``AnswerLost``.

**Kept connections** are reused (httpx's pool, 5 s), and a server closes an idle one when its own
keep-alive timeout runs out, which may be just as a request leaves on it: the request then fails
before any answer (a reset, or "disconnected without sending a response") though the IdP is fine.
httpcore's ``trace`` says whether a request went out on a kept connection (``_Trace``); one that
broke that way is sent again, on another connection (``STALE_RETRIES``), as Go's ``net/http`` does.
A new connection that breaks, a timeout, or an answer whose head came is never sent again here.

**Clients**: one httpx client (its own connection pool) per CA bundle path, proxy and client
certificate, kept in ``_clients`` for connection reuse. The transport owns every client it made and
closes each one itself: a client replaced by one for the certificate's renewed files is closed as
soon as no request is in flight on it (``_Kept.busy``: from the moment a request takes it, through
its turn at the IdP and its answer, never under one, never cancelling one), and the rest at
``aclose``. A transport given to ``IdpTransport`` (a test's) is shared by all its clients and closed
once, by ``aclose``. A CA bundle file is read when a client is made: a changed bundle is not looked
for (no new client for it).

**Client certificates** (RFC 8705 ``tls_client_auth``): a profile's certificate and key files are
loaded into its own SSL context, presented on the TLS connection to the IdP. The files are looked
at (``os.stat``) for every request: a renewed certificate (cert-manager, an ACME client) is picked
up at once, by a new client that takes the old one's place. An expired certificate is not
presented (``UpstreamTransient`` naming it: the IdP would refuse it); one that expires within
``CERT_WARNING`` is logged once per file version, and ``status`` shows each one's expiry
(``cert_info``).

Must never: parse a token response (``oidc.parse_*`` does), log a request body, put more of an OS
error than ``_safe`` allows into a message, or a proxy's credentials (``proxies.shown`` only; a
proxy's answer that quotes them back, e.g. in a 407's reason phrase, is ``proxies.scrub``bed in every
encoding they travel in). Only a tunnel (CONNECT) carries them: a proxy is never given a plain-http
request with credentials, since plain http goes only to loopback, and loopback goes direct.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import httpx
import trio
from cryptography import x509

from dc_broker.errors import AnswerLost, UpstreamGarbage, UpstreamTransient, causes, telling
from dc_broker.idp import proxies
from dc_broker.idp.oidc import HttpRequest, HttpResponse
from dc_token.errors import NOTHING_ANSWERS

#: requests at the same IdP (scheme, host, port) at once; the rest wait their turn in order. httpcore's
#: connection pool re-scans every waiting request each time one finishes: 1,000 profiles refreshing
#: against one IdP at once pinned the event loop there (a broker that then could not even stop)
MAX_PER_ORIGIN: Final = 16
#: a request that meets a kept connection the IdP has just closed (its keep-alive timeout ran out as
#: the request left: Apache's and hypercorn's is 5 s, httpx's own expiry too) goes again, on another:
#: once per kept connection at most (httpx keeps 20, ``httpx.Limits``' default), since each one that
#: breaks is dropped. The IdP had not read it, or (a server that dies mid-request) it is a token
#: endpoint POST, safe to repeat: a repeated grant is another grant, and a rotated refresh token
#: whose answer was lost is spent either way
STALE_RETRIES: Final = 20
#: the largest IdP answer read (a token response is a few KiB)
_MAX_BODY: Final = 1024 * 1024
#: a client certificate that expires within this many seconds is warned about in the log
CERT_WARNING: Final = 14 * 86400.0
#: the longest a replaced client's closing may take (closing its idle connections: local, at once)
_CLOSE_WITHIN: Final = 5.0
log = logging.getLogger("dc_broker.idp")


@dataclass(frozen=True, slots=True)
class ClientCert:
    """A profile's client certificate (PEM, chain allowed) and its key file (None: in the same file)."""

    cert: str
    key: str | None = None


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What ``status`` shows of a client certificate: its subject and when it expires (unix seconds)."""

    subject: str
    not_after: float


def _version(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


_CERT_CACHE: dict[str, tuple[tuple[int, int, int, int], CertInfo]] = {}


def cert_info(path: str) -> CertInfo:
    """The first certificate in ``path`` (the client's own), read again whenever the file changes.
    Raises ``OSError`` or ``ValueError`` for a file that is missing or not a PEM certificate."""
    version = _version(path)
    cached = _CERT_CACHE.get(path)
    if cached is not None and cached[0] == version:
        return cached[1]
    with open(path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    info = CertInfo(cert.subject.rfc4514_string(), cert.not_valid_after_utc.timestamp())
    _CERT_CACHE[path] = (version, info)
    return info


@dataclass(eq=False, slots=True)
class _Kept:
    """A client kept for its (CA bundle, proxy, certificate), made for the certificate's files as they
    were (``version``); ``busy``: the requests that took it and have not finished."""

    client: httpx.AsyncClient
    version: object
    busy: int = 0


class _Shared(httpx.AsyncBaseTransport):
    """A transport given to ``IdpTransport``, shared by all its clients: closing one (a replaced one)
    leaves it open for the others; ``IdpTransport.aclose`` closes it."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self.transport = transport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.transport.handle_async_request(request)

    async def aclose(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0
    read: float = 10.0
    write: float = 5.0
    pool: float = 5.0
    #: the whole request, connect to last byte: a server that drips its answer cannot hold a
    #: refresh for ever (httpx's read timeout applies per chunk)
    total: float = 20.0
    #: a token grant (``HttpRequest.patient``): per chunk, and connect to last byte
    patient_read: float = 120.0
    patient_total: float = 180.0


class IdpTransport:
    """Sends HttpRequests with httpx. One AsyncClient per (CA bundle, proxy, client certificate), kept
    for connection reuse; one replaced by a renewed certificate's is closed once nothing is sent on it.

    ``environ`` (default ``os.environ``) is read once, here: a proxy variable that is no usable
    proxy URL is a ``ConfigError`` at start-up, not a failure of every refresh."""

    def __init__(
        self,
        timeouts: Timeouts = Timeouts(),
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._timeout = httpx.Timeout(timeouts.read, connect=timeouts.connect, write=timeouts.write, pool=timeouts.pool)
        self._patient_timeout = httpx.Timeout(
            timeouts.patient_read, connect=timeouts.connect, write=timeouts.write, pool=timeouts.pool
        )
        self._total = timeouts.total
        self._patient_total = timeouts.patient_total
        self._given = transport
        self._transport = None if transport is None else _Shared(transport)
        self._env = proxies.EnvProxies.from_environ(os.environ if environ is None else environ)
        #: the client for each (CA bundle, proxy, certificate), made for the certificate's files as they are
        self._clients: dict[tuple[str | None, str | None, ClientCert | None], _Kept] = {}
        #: clients replaced by a renewed certificate's, each closed when its last request ends
        self._replaced: set[_Kept] = set()
        #: requests at once per IdP origin (``MAX_PER_ORIGIN``)
        self._limits: dict[str, trio.CapacityLimiter] = {}
        #: (certificate path, its version) already warned about as expiring soon
        self._warned: set[tuple[object, ...]] = set()

    def _cert_version(self, cert: ClientCert | None) -> object:
        """What identifies the certificate's files as they are now (a renewal is a new client)."""
        if cert is None:
            return None
        try:
            return (cert, _version(cert.cert), None if cert.key is None else _version(cert.key))
        except OSError as exc:
            raise UpstreamTransient(_unreadable(cert, exc)) from None

    def _check_cert(self, cert: ClientCert, version: object) -> None:
        """An expired certificate is not presented; one about to expire is logged once per version."""
        try:
            info = cert_info(cert.cert)
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not a PEM certificate"
            raise UpstreamTransient(f"the client certificate {cert.cert} cannot be loaded: {why}") from None
        left = info.not_after - datetime.datetime.now(datetime.UTC).timestamp()
        when = datetime.datetime.fromtimestamp(info.not_after, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        if left <= 0:
            raise UpstreamTransient(f"the client certificate {cert.cert} ({info.subject}) expired at {when}; renew it")
        if left < CERT_WARNING and (cert.cert, version) not in self._warned:
            self._warned.add((cert.cert, version))
            log.warning(
                "the client certificate %s (%s) expires at %s, in %.1f days: renew it",
                cert.cert,
                info.subject,
                when,
                left / 86400,
            )

    def _check_key_mode(self, cert: ClientCert, version: object) -> None:
        """A client key others may read is used, and logged once per version (chmod 600 it)."""
        key = cert.key or cert.cert
        try:
            mode = stat.S_IMODE(os.stat(key).st_mode)
        except OSError:
            return  # loading it says what is wrong
        if mode & 0o077 and (key, version, "mode") not in self._warned:
            self._warned.add((key, version, "mode"))
            log.warning(
                "the client key %s can be read by others (mode %04o): make it readable by the broker's user only "
                "(`chmod 600 %s`)",
                key,
                mode,
                key,
            )

    def _client(self, ca_bundle: str | None, via: str | None, cert: ClientCert | None = None) -> _Kept:
        """The client for a request, counted busy (``_release`` it when the request is done). A
        certificate renewed since its client was made gets a new client, and the old one is
        ``_replaced``: closed by the ``_release`` that leaves nothing in flight on it."""
        version = self._cert_version(cert)
        kept = self._clients.get((ca_bundle, via, cert))
        if kept is None or kept.version != version:
            verify: ssl.SSLContext | bool = True
            if ca_bundle is not None:
                verify = ssl.create_default_context(cafile=ca_bundle)
            elif cert is not None:  # the roots every other profile trusts (httpx's own), and the certificate
                verify = httpx.create_ssl_context(trust_env=False)
            if cert is not None:
                assert isinstance(verify, ssl.SSLContext)
                self._check_cert(cert, version)
                self._check_key_mode(cert, version)
                _load_cert_chain(verify, cert)
            client = httpx.AsyncClient(
                timeout=self._timeout,
                verify=verify,
                transport=self._transport,
                proxy=via,
                follow_redirects=False,
                trust_env=False,
                headers={"User-Agent": "dc-broker"},
            )
            if kept is not None:
                self._replaced.add(kept)
            kept = self._clients[(ca_bundle, via, cert)] = _Kept(client, version)
        elif cert is not None:
            self._check_cert(cert, version)  # a certificate can expire while its client is kept
        kept.busy += 1  # before any await: a renewal meanwhile must not close it under this request
        return kept

    async def _release(self, kept: _Kept) -> None:
        """A request on ``kept`` is done; every replaced client with nothing in flight is closed (the
        one just replaced too, when this request made its successor). Shielded: a cancelled request
        still closes what it leaves idle; and a closing that fails never takes the place of the
        request's own answer or error."""
        kept.busy -= 1
        idle = [k for k in self._replaced if k.busy == 0]
        self._replaced.difference_update(idle)
        for k in idle:
            with trio.move_on_after(_CLOSE_WITHIN, shield=True):
                try:
                    await k.client.aclose()
                except Exception as exc:  # its connections are dropped with it either way
                    log.debug("closing a replaced IdP client failed (%s)", type(exc).__name__)

    def via(self, url: str, proxy: str | None) -> str | None:
        """The proxy a request to ``url`` goes through, as messages show it (None: direct)."""
        route = proxies.route(url, proxy, self._env)
        return None if route is None else proxies.shown(route)

    async def send(
        self,
        req: HttpRequest,
        *,
        ca_bundle: str | None = None,
        proxy: str | None = None,
        client_cert: ClientCert | None = None,
        remake: Callable[[], HttpRequest] | None = None,
    ) -> HttpResponse:
        """``proxy``: the profile's setting (a URL, ``direct``, or None for the environment's);
        ``client_cert``: the certificate to present (tls_client_auth); ``remake``: the request made
        anew for each sending after the first (one that carries a client assertion: its ``jti`` is
        single-use, and a server that read the first sending before it broke has spent it)."""
        if req.assertion is not None:
            raise TypeError("a request whose client assertion was not made yet (assertions.complete) cannot be sent")
        via = proxies.route(req.url, proxy, self._env)
        try:
            kept = self._client(ca_bundle, via, client_cert)
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamTransient(f"CA bundle {ca_bundle} cannot be loaded: {exc}") from None
        try:
            return await self._send_on(kept.client, req, via, remake)
        finally:
            await self._release(kept)

    async def _send_on(
        self, client: httpx.AsyncClient, req: HttpRequest, via: str | None, remake: Callable[[], HttpRequest] | None
    ) -> HttpResponse:
        content = req.body() if req.form else None
        origin = _origin(req.url)
        where = origin + ("" if via is None else f" via proxy {proxies.shown(via)}")
        total = self._patient_total if req.patient else self._total
        limit = self._limits.get(origin)
        if limit is None:
            limit = self._limits[origin] = trio.CapacityLimiter(MAX_PER_ORIGIN)
        async with limit:  # a queue here, FIFO: httpx's own pool slows to a crawl with hundreds waiting
            with trio.move_on_after(total):
                resp = await self._send(client, req, content, where, via, remake)
                if via is not None and resp.status == 407:  # a plain-http IdP: the proxy answers in its stead
                    raise _proxy_refused(via, req.url, "407 Proxy Authentication Required")
                return resp
        lost = AnswerLost if req.precious else UpstreamTransient
        raise lost(f"identity provider did not finish answering within {total:g} s at {where}")

    async def _send(
        self,
        client: httpx.AsyncClient,
        req: HttpRequest,
        content: bytes | None,
        where: str,
        via: str | None,
        remake: Callable[[], HttpRequest] | None,
    ) -> HttpResponse:
        timeout = self._patient_timeout if req.patient else self._timeout
        attempts = 0
        while True:
            attempts += 1
            trace = _Trace()
            try:
                return await self._exchange(client, req, content, timeout, trace)
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:
                if not trace.stale or attempts > STALE_RETRIES:
                    raise _failure(exc, req, where, via) from None
                # the server closed a kept connection as the request left (its keep-alive timeout)
                # and never read it, or died before its answer's head: it goes again, on another
                log.debug("%s closed a kept connection unanswered (%s); sending again", where, type(exc).__name__)
                if remake is not None:
                    content = remake().body()
            except httpx.TransportError as exc:
                raise _failure(exc, req, where, via) from None

    async def _exchange(
        self, client: httpx.AsyncClient, req: HttpRequest, content: bytes | None, timeout: httpx.Timeout, trace: _Trace
    ) -> HttpResponse:
        async with client.stream(
            req.method,
            req.url,
            headers=dict(req.headers),
            content=content,
            timeout=timeout,
            extensions={"trace": trace},
        ) as resp:
            body = b""
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > _MAX_BODY:
                    raise UpstreamGarbage(f"identity provider answer exceeds {_MAX_BODY} bytes")
            headers = {k.lower(): v for k, v in resp.headers.items()}
            return HttpResponse(resp.status_code, headers, body)

    async def aclose(self) -> None:
        """Closes every client (a replaced one still busy too) and the transport given, if any."""
        kept = [*self._clients.values(), *self._replaced]
        self._clients.clear()
        self._replaced.clear()
        for k in kept:
            await k.client.aclose()
        if self._given is not None:
            await self._given.aclose()


class _Encrypted(Exception):
    """The client key asks for a passphrase (raised from OpenSSL's password callback)."""


def _no_passphrase() -> str:
    # without a callback OpenSSL asks on the terminal, which would hold the whole event loop
    raise _Encrypted


def _load_cert_chain(context: ssl.SSLContext, cert: ClientCert) -> None:
    """The client certificate and its key into ``context``, or an error that names the file and the fix."""
    key = cert.key or cert.cert
    try:
        context.load_cert_chain(cert.cert, cert.key, password=_no_passphrase)
    except _Encrypted:
        why = (
            f"the client key {key} is encrypted (it asks for a passphrase): dc-broker needs the key unencrypted, "
            f"in a file only its user can read (e.g. `openssl pkey -in {key} -out NEW.key`)"
        )
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            why = f"the client certificate {cert.cert} does not match the key {key}: give the key made with it"
        elif cert.key is None:
            why = f"the client certificate {cert.cert} holds no private key: give its key file (--client-key)"
        else:
            why = f"the client certificate {cert.cert} or its key {key} cannot be loaded ({exc.reason or exc})"
    except OSError as exc:
        why = _unreadable(cert, exc)
    else:
        return
    raise UpstreamTransient(why) from None


def _unreadable(cert: ClientCert, exc: OSError) -> str:
    files = cert.cert if cert.key is None else f"{cert.cert} or its key {cert.key}"
    return f"the client certificate {files} cannot be read: {exc.strerror}"


def _failure(exc: httpx.TransportError, req: HttpRequest, where: str, via: str | None) -> UpstreamTransient:
    """An httpx failure as the broker's own error: ``AnswerLost`` when it may have come after a
    request that spends a single-use credential went out."""
    lost = AnswerLost if req.precious and _maybe_sent(exc) else UpstreamTransient
    if isinstance(exc, httpx.TimeoutException):
        return lost(f"identity provider timed out ({type(exc).__name__}) at {where}")
    if isinstance(exc, httpx.ProxyError):  # the proxy's answer to CONNECT, e.g. "502 Bad Gateway"
        return _proxy_refused(via or "", req.url, _safe(exc, via, named=False))
    if _refused(exc):  # not slow, not down for a moment: nothing listens there
        if via is None:
            return lost(
                f"{NOTHING_ANSWERS}{_address(req.url)} (connection refused): the server URL is wrong or the "
                "identity provider is not running"
            )
        return lost(
            f"{NOTHING_ANSWERS}{_address(via)} (connection refused), the way to {_origin(req.url)} via proxy "
            f"{proxies.shown(via)}: the proxy setting is wrong or the proxy is not running"
        )
    hint = ""
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in causes(exc)):
        hint = "; if the IdP's certificate comes from a private CA, give the profile its CA (ca_bundle = PATH)"
    return lost(f"identity provider unreachable at {where}: {_safe(exc, via)}{hint}")


class _Trace:
    """httpcore's ``trace`` extension for one attempt: whether the request went out on a kept
    connection (no connection was opened for it) and whether any of its answer came back. Only
    httpcore says so: with another transport (a test's ``MockTransport``) nothing is known, and
    nothing is ``stale``."""

    __slots__ = ("answered", "opened", "sent")

    def __init__(self) -> None:
        self.opened = self.sent = self.answered = False

    async def __call__(self, name: str, info: object) -> None:
        if name.startswith("connection.connect_"):  # connect_tcp, connect_unix_socket
            self.opened = True
        elif name == "http11.send_request_headers.started":
            self.sent = True
        elif name == "http11.receive_response_headers.complete":
            self.answered = True

    @property
    def stale(self) -> bool:
        """Sent on a kept connection that broke before any answer: the server had closed it."""
        return self.sent and not self.opened and not self.answered


def _maybe_sent(exc: httpx.TransportError) -> bool:
    """Whether the request may have reached the IdP: anything but a failure to connect (or to get
    a connection from the pool) may have come after the request went out."""
    return not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


def _refused(exc: httpx.TransportError) -> bool:
    """Whether every address tried refused the connection (trio tries each one the name resolves to
    and raises an ``OSError`` over the group of their failures)."""
    if not isinstance(exc, httpx.ConnectError):
        return False
    for cause in causes(exc):
        if isinstance(cause, BaseExceptionGroup):
            refused, other = cause.split(ConnectionRefusedError)  # nested groups included
            return refused is not None and other is None
        if isinstance(cause, ConnectionRefusedError):
            return True
    return False


def _address(url: str) -> str:
    """``HOST:PORT`` that a connection to ``url`` goes to (the scheme's port if the URL names none)."""
    parts = httpx.URL(url)
    return proxies.host_port(parts.host, parts.port or proxies.DEFAULT_PORTS.get(parts.scheme, 0))


def _proxy_refused(via: str, url: str, answer: str) -> UpstreamTransient:
    proxy, target = proxies.shown(via), _origin(url)
    if answer.startswith("407"):
        return UpstreamTransient(
            f"the proxy {proxy} refused to reach {target} without valid credentials ({answer}): proxy "
            "credentials come from the broker's environment, https_proxy=http://USER:PASSWORD@HOST:PORT "
            "(with the profile's proxy unset)"
        )
    return UpstreamTransient(
        f"the proxy {proxy} could not reach {target} ({answer}): check the IdP's host name, or let it "
        'bypass the proxy (no_proxy, or the profile\'s proxy = "direct")'
    )


def _origin(url: str) -> str:
    parts = httpx.URL(url)
    return f"{parts.scheme}://{parts.host}{':' + str(parts.port) if parts.port else ''}"


def _safe(exc: BaseException, via: str | None = None, *, named: bool = True) -> str:
    """The exception's telling message (httpx transport errors carry OS-level ones, never the request
    body), short, and should one ever quote the proxy URL, without its credentials."""
    return proxies.scrub(telling(exc, named=named), via)[:200]
