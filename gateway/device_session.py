"""One session with one device over the radio: the GATEWAY role of ``protocols.session``.

The protocol code decides everything; this module only moves its fragments over a
:class:`~gateway.radio.base.Link` and turns what happens into typed errors: the radio
failed (:class:`DeviceUnavailable`), the session failed (:class:`SessionError`, with the
protocol's code), or the device refused one request (:class:`RequestRefused`, the session
stays up).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Final, Self, TypeVar

from gateway.radio.base import Link, RadioError
from protocols.errors import ErrorCode, ProtocolError
from protocols.messages import DeviceHello, ErrorReply, Message
from protocols.session import (
    GatewaySessionConfig,
    HandshakeComplete,
    MessageReceived,
    Session,
    SessionFailed,
)

DEFAULT_IDLE_TIMEOUT: Final = 5.0
"""Seconds without any traffic from the device after which a session is given up. Idle,
not total: a batch of 1,000 records at MTU 23 is some 1,700 notifications, and it may take
as long as it needs while they keep coming."""

READER_STOP_TIMEOUT: Final = 1.0
"""Seconds close() gives the notification reader to stop before it disconnects anyway."""

_M = TypeVar("_M", bound=Message)


class DeviceError(Exception):
    """A session with a device did not do what was asked."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class DeviceUnavailable(DeviceError):
    """The radio could not reach the device, or lost it."""


class SessionError(DeviceError):
    """The session failed; ``by_peer`` when the device reported the error."""

    def __init__(self, error: ProtocolError, *, by_peer: bool) -> None:
        side = "device reported" if by_peer else "gateway detected"
        super().__init__(error.code, f"{side} {error.code.name}: {error.message}")
        self.error = error
        self.by_peer = by_peer


class RequestRefused(DeviceError):
    """The device refused one request with a typed error; the session is still usable."""


class DeviceSession:
    """Run a gateway-role session over ``link``; ``async with`` opens and closes it."""

    def __init__(
        self,
        link: Link,
        config: GatewaySessionConfig,
        *,
        timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        self.link = link
        self.session = Session.gateway(config, mtu=link.mtu)
        self.timeout = timeout
        self.device: DeviceHello | None = None
        self._responses: dict[int, asyncio.Future[Message]] = {}
        self._handshake: asyncio.Future[DeviceHello] | None = None
        self._failure: DeviceError | None = None
        self._reader: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._last_activity = 0.0

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def open(self) -> DeviceHello:
        """Handshake; returns the device's authenticated hello."""
        loop = asyncio.get_running_loop()
        self._last_activity = loop.time()
        self._handshake = loop.create_future()
        self._reader = asyncio.create_task(self._read(), name=f"read {self.link.address}")
        try:
            self.session.start()
            await self._flush()
            self.device = await self._wait(self._handshake, "the handshake")
        except BaseException:
            await self.close()  # the link is free again before the caller hears of it
            raise
        return self.device

    async def request(self, message: Message, response_type: type[_M]) -> _M:
        """Send one request and return its response; a typed refusal raises RequestRefused."""
        self._raise_if_failed()
        try:
            request_id = self.session.send_request(message)
        except ProtocolError as exc:
            raise SessionError(exc, by_peer=False) from exc
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._responses[request_id] = future
        await self._flush()
        response = await self._wait(future, type(message).__name__)
        if isinstance(response, ErrorReply):
            raise RequestRefused(response.code, f"{response.code.name}: {response.message}")
        if not isinstance(response, response_type):
            # Session already checks the pairing; this narrows the type for the caller.
            msg = f"{type(message).__name__} answered with {type(response).__name__}"
            raise SessionError(ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, msg), by_peer=False)
        return response

    async def close(self) -> None:
        """End the session and drop the link.

        The reader is cancelled but not waited on without bound: a link that drops in the
        same moment can wake it with the drop instead of the cancellation, and the caller's
        own cancellation (a scheduler shutting down) must never be held up or swallowed.
        Disconnecting wakes any reader still waiting.
        """
        self.session.close()
        reader, self._reader = self._reader, None
        if reader is not None and not reader.done():
            reader.cancel()
            await asyncio.wait({reader}, timeout=READER_STOP_TIMEOUT)
        with contextlib.suppress(RadioError):
            await self.link.disconnect()

    # -- internals -------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while self._failure is None:
                fragment = await self.link.receive()
                self._last_activity = asyncio.get_running_loop().time()
                self.session.receive_fragment(fragment)
                self._dispatch()
                await self._flush()
        except RadioError as exc:
            self._fail(DeviceUnavailable(ErrorCode.SESSION_CLOSED, f"link lost: {exc}"))
        # A failed session cannot recover; the error (already sent to the device) stands,
        # and the link is freed for the next session.
        with contextlib.suppress(RadioError):
            await self.link.disconnect()

    def _dispatch(self) -> None:
        for event in self.session.events():
            if isinstance(event, HandshakeComplete):
                if self._handshake is not None and not self._handshake.done():
                    assert event.device is not None  # the gateway role always learns the device
                    self._handshake.set_result(event.device)
            elif isinstance(event, MessageReceived):
                future = self._responses.pop(event.request_id, None)
                if future is not None and not future.done():
                    future.set_result(event.message)
            elif isinstance(event, SessionFailed):
                self._fail(SessionError(event.error, by_peer=event.by_peer))

    async def _flush(self) -> None:
        fragments = self.session.data_to_send()
        if not fragments:
            return
        async with self._write_lock:
            try:
                for fragment in fragments:
                    await self.link.write(fragment)
                    self._last_activity = asyncio.get_running_loop().time()
            except RadioError as exc:
                self._fail(DeviceUnavailable(ErrorCode.SESSION_CLOSED, f"write failed: {exc}"))

    async def _wait(self, future: asyncio.Future[_M], what: str) -> _M:
        """Wait for ``future`` while the device keeps talking; give up after idle time."""
        loop = asyncio.get_running_loop()
        while True:
            remaining = self._last_activity + self.timeout - loop.time()
            if remaining <= 0:
                self.session.close()
                message = f"no traffic for {self.timeout:g} s while waiting for {what}"
                raise DeviceUnavailable(ErrorCode.BUSY, message)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    # Shielded: an idle check must not cancel the answer it waits for.
                    return await asyncio.shield(future)

    def _fail(self, error: DeviceError) -> None:
        if self._failure is None:
            self._failure = error
        pending: list[asyncio.Future[Any]] = [*self._responses.values()]
        if self._handshake is not None:
            pending.append(self._handshake)
        for future in pending:
            if not future.done():
                future.set_exception(self._failure)
                # A caller may have stopped waiting (a timeout, a shutdown); the error is
                # also raised by the next request, so an unawaited copy is not news.
                future.add_done_callback(_observe)
        self._responses.clear()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure


def _observe(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
