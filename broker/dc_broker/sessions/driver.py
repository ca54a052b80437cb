"""The one driver of the grant flows: it steps a pure flow (``dc_broker.sessions.flows``) to its end.

httpx's ``Auth.async_auth_flow`` is the model: one loop; the flow yields a step, the driver performs
it and sends back the answer. Steps meant for a person (``ShowCode``, ``OpenBrowser``) are handed out
to the caller (an interactive login streams them to `dc-broker login`); every other step is performed
by the ``perform`` callable the session gives (send a request, sleep, forget a dead refresh token,
wait for a browser's redirect), whose answer goes back into the flow. The flow's result comes last,
as ``Done``.

    async with steps(flow, perform) as each:          # an interactive login
        async for item in each:
            ...                                       # a ShowCode / OpenBrowser, then Done(tokens)

    tokens = await drive(flow, perform)               # everything else: no step for a person

Must never: build or parse a request (the flows do), know which profile it serves, or keep an
unfinished flow open (the flow is closed whatever happens).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from dc_broker.sessions.flows import Flow, OpenBrowser, ShowCode, Step

T = TypeVar("T")
#: the steps a person sees; the driver hands them out instead of performing them
PERSON_STEPS = (ShowCode, OpenBrowser)
Perform = Callable[[Step], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Done(Generic[T]):
    """The flow's result: the last item ``steps`` yields."""

    value: T


async def _run(flow: Flow[T], perform: Perform) -> AsyncGenerator[ShowCode | OpenBrowser | Done[T], None]:
    answer: object = None
    try:
        while True:
            try:
                step = flow.send(answer)
            except StopIteration as stop:
                yield Done(stop.value)
                return
            if isinstance(step, PERSON_STEPS):
                yield step
                answer = None
            else:
                answer = await perform(step)
    finally:
        flow.close()


@asynccontextmanager
async def steps(flow: Flow[T], perform: Perform) -> AsyncIterator[AsyncIterator[ShowCode | OpenBrowser | Done[T]]]:
    """The flow's steps for a person, then ``Done(result)``; closed when the ``async with`` ends."""
    run = _run(flow, perform)
    try:
        yield run
    finally:
        await run.aclose()


async def drive(flow: Flow[T], perform: Perform) -> T:
    """Step ``flow`` to its result. A flow that asks for a person here is a bug (``TypeError``)."""
    async with steps(flow, perform) as each:
        async for item in each:
            if isinstance(item, Done):
                return item.value
            raise TypeError(f"this flow needs a person ({type(item).__name__}); drive it with steps()")
    raise AssertionError("a flow's steps end with Done")  # pragma: no cover - _run always yields Done last
