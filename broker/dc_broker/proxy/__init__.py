"""``dc-broker proxy``: an authenticating local HTTP proxy in front of one upstream API.

    dc-broker proxy acme --upstream https://dc.example.com [--listen 127.0.0.1:8765 | --listen unix:PATH]
    curl http://127.0.0.1:8765/dp/api/v1/aiconnections/types        # no token in sight

For programs that can only be pointed at a URL (a BI tool, Postman, a notebook, a language without a
client library). Its own process, a client of the broker's socket; the daemon knows nothing about it.

    rules.py     PURE  who may use it, which requests go upstream, headers, Host/Origin, what a 401
                       means, the time limits, and every answer the proxy gives itself
    serve.py     edge  listen, accept, the caller from the kernel (``dc_broker.access.peer``), h11,
                       streaming both ways, every failure mapped to one request's answer; run_proxy
    broker.py    edge  each request's token, asked of the broker (its word is final: lock, logout,
                       remove and invalidate hold from the next request)
    upstream.py  edge  the upstream's checks, verified TLS, the HTTP/1.1 connections to it (h11, kept
                       for reuse; through the route's HTTP proxy: CONNECT, or the absolute form)
    stream.py    edge  RawStream: trio's stream over a non-blocking socket, through the scheduler only
                       when a call would block (and every 16 calls)

Nothing is imported here, so the pure rules can be imported without trio, httpx or h11.
"""
