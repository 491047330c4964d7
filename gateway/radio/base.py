"""The one boundary between the daemon and a radio backend.

Only plain bytes, strings, numbers and :class:`ScanResult` cross it. A backend (Bumble today,
perhaps BlueZ through bleak tomorrow) implements :class:`Radio` and :class:`Link` and
translates its own exceptions into the :class:`RadioError` family (``raise ... from exc``).

The radio layer moves opaque fragments: one ATT write or one notification is one fragment.
Framing, crypto and protocol logic live above it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Self

from gateway.cancellation import reraise_lost_cancellation
from protocols.gatt import MAX_ATT_MTU, MAX_ATTRIBUTE_VALUE_SIZE, max_fragment_size

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "CLOSE_TIMEOUT",
    "CONNECT_CANCEL_GRACE",
    "DEFAULT_CONNECT_TIMEOUT",
    "DISCONNECT_TIMEOUT",
    "MAX_ATTRIBUTE_VALUE_SIZE",
    "OPEN_TIMEOUT",
    "SCAN_STOP_TIMEOUT",
    "WRITE_TIMEOUT",
    "Link",
    "Radio",
    "RadioConnectError",
    "RadioDisconnectedError",
    "RadioError",
    "RadioTimeoutError",
    "ScanResult",
    "max_fragment_size",
]

# --------------------------------------------------------------------------------------------
# Timing: every delay the radio layer waits for, in seconds, in one place.
# --------------------------------------------------------------------------------------------

OPEN_TIMEOUT: Final = 10.0
"""Opening the adapter: transport open plus HCI reset and controller set-up."""

DEFAULT_CONNECT_TIMEOUT: Final = 10.0
"""Default for :meth:`Radio.connect`: from the connect call to an established link."""

CONNECT_CANCEL_GRACE: Final = 2.0
"""After the connect timeout the backend cancels the pending connection and waits this long
for the controller to confirm; a controller that never confirms is abandoned then."""

WRITE_TIMEOUT: Final = 10.0
"""One ATT write, from the request until the peer's write response."""

DISCONNECT_TIMEOUT: Final = 5.0
"""Waiting for the controller to confirm a disconnection we asked for."""

SCAN_STOP_TIMEOUT: Final = 5.0
"""Waiting for the controller to confirm that scanning stopped."""

CLOSE_TIMEOUT: Final = 5.0
"""Closing the adapter: stopping the scan and powering the host stack off."""

# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class RadioError(Exception):
    """Anything that went wrong in the radio or its backend."""


class RadioConnectError(RadioError):
    """A link could not be established (or its GATT set-up failed)."""


class RadioDisconnectedError(RadioError):
    """The link is down: raised by receive/write after a drop or a disconnect."""


class RadioTimeoutError(RadioError):
    """The radio or the peer did not answer in time."""


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScanResult:
    """One advertisement (merged with its scan response, where the backend does that)."""

    address: str
    """Peer address as the backend spells it, to be passed back to :meth:`Radio.connect`."""
    rssi: int
    """Received signal strength in dBm."""
    manufacturer_data: Mapping[int, bytes]
    """Company identifier -> manufacturer specific data (without the identifier)."""
    local_name: str | None
    connectable: bool


# --------------------------------------------------------------------------------------------
# Link and Radio
# --------------------------------------------------------------------------------------------


class Link(ABC):
    """A connected peer with the lockgw service discovered and notifications subscribed.

    Use as an async context manager: leaving it disconnects.
    """

    @property
    @abstractmethod
    def address(self) -> str:
        """The peer's address."""

    @property
    @abstractmethod
    def mtu(self) -> int:
        """The negotiated ATT MTU."""

    @property
    def max_fragment_size(self) -> int:
        """Largest fragment :meth:`write` accepts: ``min(mtu - 3, 512)``."""
        return max_fragment_size(self.mtu)

    @property
    @abstractmethod
    def is_connected(self) -> bool:
        """False from the moment the link is known to be down."""

    @abstractmethod
    async def write(self, fragment: bytes) -> None:
        """Write one fragment to the write characteristic.

        Raises ValueError if ``len(fragment) > max_fragment_size``,
        RadioDisconnectedError if the link is down, RadioTimeoutError, RadioError.
        """

    @abstractmethod
    async def receive(self) -> bytes:
        """Next notification of the notify characteristic, in the order the peer sent them.

        Notifications that arrived before a drop are still returned; once they are drained
        every call raises RadioDisconnectedError.
        """

    @abstractmethod
    async def disconnect(self) -> None:
        """Disconnect; a no-op on a link that is already down."""

    @abstractmethod
    def add_disconnect_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once when the link goes down, whichever side dropped it.

        On a link that is already down it is called at once.
        """

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.disconnect()


class Radio(ABC):
    """A Bluetooth LE adapter in the central role.

    Use as an async context manager: entering opens the adapter, leaving disconnects every
    link and closes it.
    """

    @abstractmethod
    async def open(self) -> None:
        """Open and initialise the adapter. Raises RadioError."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect every link, stop scanning and release the adapter. Idempotent."""

    @abstractmethod
    def scan(self, *, duration: float | None = None) -> AsyncGenerator[ScanResult, None]:
        """Yield advertisements as they arrive.

        With ``duration`` the iteration ends after that many seconds; with None it runs until
        the consumer stops. Several scans may run at once; the adapter scans while at least
        one is being iterated. Close the iterator (``contextlib.aclosing``) to stop
        promptly.
        """

    @abstractmethod
    async def connect(
        self,
        address: str,
        *,
        mtu: int = MAX_ATT_MTU,
        # The radio's own timeout (as in bleak): on expiry a backend must cancel the pending
        # connection at the controller, which an outer asyncio.timeout cannot do.
        timeout: float = DEFAULT_CONNECT_TIMEOUT,  # noqa: ASYNC109 - the radio cancels at the controller
        on_established: Callable[[], None] | None = None,
    ) -> Link:
        """Connect, exchange the ATT MTU (up to ``mtu``), discover the lockgw service, subscribe
        to its notifications, and only then return the link.

        ``on_established`` is called as soon as the link-layer connection is up, before the
        GATT set-up: the radio's initiator is free from then on for the next connection.

        Raises RadioConnectError or RadioTimeoutError.
        """

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


SCAN_QUEUE_SIZE: Final = 4096
"""Advertisements buffered per scan consumer; a consumer that falls further behind loses the
newest ones (adverts repeat, nothing is lost for good)."""

_logger = logging.getLogger(__name__)


class ScanFanout:
    """Hands every scan result to each consumer of :meth:`Radio.scan` in a bounded queue of
    its own, so several consumers share the one scan an adapter can run."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[ScanResult | None]] = set()

    @property
    def wanted(self) -> bool:
        """Whether anyone is reading: the backend scans exactly while this holds."""
        return bool(self._queues)

    def publish(self, result: ScanResult) -> None:
        for queue in self._queues:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(result)

    def end(self) -> None:
        """The radio closed or was lost: every consumer's scan ends with a RadioError."""
        for queue in self._queues:
            while True:
                try:
                    queue.put_nowait(None)
                    break
                except asyncio.QueueFull:
                    queue.get_nowait()  # make room for the end marker

    async def results(
        self, radio: str, duration: float | None, update: Callable[[], Awaitable[None]]
    ) -> AsyncGenerator[ScanResult, None]:
        """One consumer's results; ``update`` starts or stops the backend's scan to match
        :attr:`wanted`."""
        if duration is not None and duration < 0:
            msg = f"negative scan duration {duration}"
            raise ValueError(msg)
        loop = asyncio.get_running_loop()
        deadline = None if duration is None else loop.time() + duration
        queue: asyncio.Queue[ScanResult | None] = asyncio.Queue(SCAN_QUEUE_SIZE)
        self._queues.add(queue)
        try:
            await update()
            reraise_lost_cancellation()  # Bumble's HCI commands may swallow a stop
            while True:
                if deadline is None:
                    item = await queue.get()
                else:
                    try:
                        async with asyncio.timeout_at(deadline):
                            item = await queue.get()
                    except TimeoutError:
                        return
                if item is None:
                    msg = f"{radio} closed or lost while scanning"
                    raise RadioError(msg)
                yield item
        finally:
            self._queues.discard(queue)
            try:
                await update()
            except RadioError as exc:
                _logger.warning("stopping the scan on %s: %s", radio, exc)


class Notifications:
    """What every backend's link does alike: queue notifications in order, then go down once.

    After :meth:`end` the notifications that already arrived are still received, then every
    :meth:`receive` raises RadioDisconnectedError; disconnect callbacks run exactly once.
    """

    def __init__(self, address: str) -> None:
        self._address = address
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._callbacks: list[Callable[[], None]] = []
        self._ended = False

    def put(self, value: bytes | bytearray) -> None:
        self._queue.put_nowait(bytes(value))  # bleak hands over a mutable bytearray

    def end(self) -> None:
        """The link is down: wake receivers after what already arrived, run the callbacks."""
        if self._ended:
            return
        self._ended = True
        self._queue.put_nowait(None)
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                _logger.exception("disconnect callback of %s failed", self._address)

    def add_callback(self, callback: Callable[[], None]) -> None:
        if self._ended:
            callback()
        else:
            self._callbacks.append(callback)

    async def receive(self) -> bytes:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # wake the next receiver, too
            msg = f"link {self._address} is down"
            raise RadioDisconnectedError(msg)
        return item
