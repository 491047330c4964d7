"""A timing model of a BLE connection, and the physical bounds it implies.

:class:`BleTiming` holds the parameters that decide how fast a lock and the gateway can
talk: PHY, connection interval, LL data packets per connection event, LL data length (DLE),
ATT MTU, connection set-up and advertising interval. From them it computes the airtime of
one LL data packet, the one-way ATT payload throughput, the time of a transfer and of a
session of request/answer round trips, and :func:`sequence_bound` the time a gateway with
a number of connection slots needs for a sequence of sessions.

The virtual radio (:class:`simulators.radio.ScalableLink`) applies the same rules when it is
given a :class:`BleTiming`, so a measurement over it can be set beside the bound.

References are to the Bluetooth Core Specification 5.4 ("Core"):

* Vol 6, Part A, 3.2 / 3.3: LE 1M and LE 2M PHYs transmit 1 and 2 Msym/s, one bit a symbol.
* Vol 6, Part B, 2.1: an uncoded LE packet is preamble (1 octet on 1M, 2 on 2M), access
  address (4), PDU, CRC (3).
* Vol 6, Part B, 2.4: a data channel PDU is a 2-octet header, a payload of 0..251 octets and,
  on an encrypted connection, a 4-octet MIC (not on an empty PDU).
* Vol 6, Part B, 4.1.1: inter frame space T_IFS = 150 us between the packets of an event.
* Vol 6, Part B, 4.5.1: connection events, connInterval 7.5 ms .. 4 s in steps of 1.25 ms;
  in an event the central and the peripheral alternate, a peripheral with nothing to send
  answers with an empty PDU (the acknowledgement).
* Vol 6, Part B, 4.5.3: the first connection event after CONNECT_IND falls in the transmit
  window, 1.25 ms (transmitWindowDelay) plus transmitWindowOffset (0 .. connInterval) later.
* Vol 6, Part B, 2.4.2 / 5.1.3.1: LL_TERMINATE_IND is a 2-octet control PDU (opcode and
  error code); the central leaves the connection once the peripheral has acknowledged it.
* Vol 6, Part B, 4.5.10: connMaxTxOctets 27 .. 251 (Data Length Extension).
* Vol 6, Part B, 4.4.2.2.1: advInterval 20 ms .. 10.24 s (plus advDelay 0 .. 10 ms).
* Vol 4, Part E, 7.8.12: one HCI_LE_Create_Connection may be pending in a controller at a
  time (until its LE Connection Complete event): connections are set up one after another.
* Vol 3, Part A, 3.1: the L2CAP basic header is 4 octets (length, channel).
* Vol 3, Part F, 3.2.8 / 3.2.9 / 3.4.5.1 / 3.4.7.1: ATT_MTU 23 .. 517, attribute values of at
  most 512 octets, Write Request and Handle Value Notification carry opcode and handle
  (3 octets) before the value.

Pure arithmetic: no I/O, no asyncio.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from protocols.gatt import ATT_HEADER_SIZE, MAX_ATT_MTU, MIN_ATT_MTU, max_fragment_size

__all__ = [
    "BEST_CASE",
    "L2CAP_HEADER_SIZE",
    "TIMINGS",
    "TYPICAL_LOCK",
    "BleTiming",
    "exchanges_from_trace",
    "sequence_bound",
]

Phy = Literal["1M", "2M"]
Initiator = Literal["any", "targeted"]

SYMBOL_RATE: Final[dict[str, float]] = {"1M": 1e6, "2M": 2e6}
"""Bits per second of the uncoded PHYs (Core Vol 6 Part A 3.2, 3.3)."""
PREAMBLE_OCTETS: Final[dict[str, int]] = {"1M": 1, "2M": 2}
"""Core Vol 6 Part B 2.1.1."""
ACCESS_ADDRESS_OCTETS: Final = 4
DATA_HEADER_OCTETS: Final = 2
MIC_OCTETS: Final = 4
CRC_OCTETS: Final = 3
LL_TERMINATE_OCTETS: Final = 2
"""LL_TERMINATE_IND's payload: opcode and error code (Core Vol 6 Part B 2.4.2)."""
T_IFS: Final = 150e-6
"""Inter frame space, seconds (Core Vol 6 Part B 4.1.1)."""
TRANSMIT_WINDOW_DELAY: Final = 1.25e-3
"""Seconds from the end of CONNECT_IND to the earliest transmit window (Vol 6 Part B 4.5.3)."""
L2CAP_HEADER_SIZE: Final = 4
"""Length and channel identifier of the L2CAP basic frame (Core Vol 3 Part A 3.1)."""
PDU_OVERHEAD: Final = L2CAP_HEADER_SIZE + ATT_HEADER_SIZE
"""Octets around every fragment on the link: L2CAP header, ATT opcode and handle."""

MIN_CONNECTION_INTERVAL: Final = 0.0075
MAX_CONNECTION_INTERVAL: Final = 4.0
CONNECTION_INTERVAL_STEP: Final = 0.00125
MIN_DATA_LENGTH: Final = 27
MAX_DATA_LENGTH: Final = 251
MIN_ADVERTISING_INTERVAL: Final = 0.02
MAX_ADVERTISING_INTERVAL: Final = 10.24


@dataclass(frozen=True)
class BleTiming:
    """How one BLE connection between the gateway and a device is timed.

    ``packets_per_event`` is what the two controllers agree to exchange per connection event
    and direction; if fewer packets of ``data_length`` octets fit in one interval, the
    interval decides (:attr:`packets_per_interval`). Fragments are the protocol's
    (:func:`protocols.gatt.max_fragment_size` of ``att_mtu``), each one ATT PDU of its own.

    Data a host hands its controller goes out at the next connection event; an answer to it
    goes out no earlier than the event after the one that delivered it (a host needs more
    than T_IFS to answer), so a request and its answer cost one connection interval at least.
    """

    phy: Phy
    connection_interval: float
    """Seconds, 7.5 ms .. 4 s in steps of 1.25 ms."""
    packets_per_event: int
    """LL data packets per direction per connection event."""
    data_length: int
    """LL payload octets per packet, 27 .. 251 (251 with the Data Length Extension)."""
    att_mtu: int
    """23 .. 517."""
    connection_setup: float
    """Seconds from CONNECT_IND to the first data event."""
    advertising_interval: float
    """Seconds between a device's adverts, 20 ms .. 10.24 s."""
    encrypted: bool = False
    """Link-layer encryption (a MIC on every non-empty packet). lockgw encrypts in its own
    Noise session over an unencrypted link, hence off by default."""

    def __post_init__(self) -> None:
        if self.phy not in SYMBOL_RATE:
            msg = f"PHY must be '1M' or '2M', not {self.phy!r}"
            raise ValueError(msg)
        interval = self.connection_interval
        if not MIN_CONNECTION_INTERVAL <= interval <= MAX_CONNECTION_INTERVAL:
            msg = f"connection interval {interval * 1000:g} ms outside 7.5 ms .. 4 s"
            raise ValueError(msg)
        steps = interval / CONNECTION_INTERVAL_STEP
        if abs(steps - round(steps)) > 1e-6:
            msg = f"connection interval {interval * 1000:g} ms is not a multiple of 1.25 ms"
            raise ValueError(msg)
        if self.packets_per_event < 1:
            msg = f"packets per event must be at least 1, not {self.packets_per_event}"
            raise ValueError(msg)
        if not MIN_DATA_LENGTH <= self.data_length <= MAX_DATA_LENGTH:
            msg = f"data length {self.data_length} outside {MIN_DATA_LENGTH}..{MAX_DATA_LENGTH}"
            raise ValueError(msg)
        if not MIN_ATT_MTU <= self.att_mtu <= MAX_ATT_MTU:
            msg = f"ATT MTU {self.att_mtu} outside {MIN_ATT_MTU}..{MAX_ATT_MTU}"
            raise ValueError(msg)
        if not 0.0 <= self.connection_setup <= MAX_CONNECTION_INTERVAL * 6:
            msg = f"connection set-up {self.connection_setup:g} s outside 0 .. 24 s"
            raise ValueError(msg)
        if not MIN_ADVERTISING_INTERVAL <= self.advertising_interval <= MAX_ADVERTISING_INTERVAL:
            msg = (
                f"advertising interval {self.advertising_interval * 1000:g} ms "
                "outside 20 ms .. 10.24 s"
            )
            raise ValueError(msg)

    # -- packets -------------------------------------------------------------------------

    def packet_airtime(self, payload: int) -> float:
        """Seconds on air of one LL data packet with ``payload`` octets (0: an empty PDU)."""
        if not 0 <= payload <= self.data_length:
            msg = f"LL payload {payload} outside 0..{self.data_length}"
            raise ValueError(msg)
        mic = MIC_OCTETS if self.encrypted and payload > 0 else 0
        octets = (
            PREAMBLE_OCTETS[self.phy]
            + ACCESS_ADDRESS_OCTETS
            + DATA_HEADER_OCTETS
            + payload
            + mic
            + CRC_OCTETS
        )
        return octets * 8 / SYMBOL_RATE[self.phy]

    def packet_slot(self, payload: int) -> float:
        """Seconds one data packet takes in an event: the packet, T_IFS, the peer's empty
        acknowledgement, T_IFS."""
        return self.packet_airtime(payload) + T_IFS + self.packet_airtime(0) + T_IFS

    @property
    def packets_per_interval(self) -> int:
        """Full-length packets per direction per event: ``packets_per_event``, or fewer if
        the interval cannot hold that many."""
        fit = math.floor(self.connection_interval / self.packet_slot(self.data_length))
        return max(1, min(self.packets_per_event, fit))

    @property
    def fragment_size(self) -> int:
        """The protocol's largest write or notification value at :attr:`att_mtu`."""
        return max_fragment_size(self.att_mtu)

    def ll_packets(self, pdu_octets: int) -> list[int]:
        """LL payload lengths carrying one L2CAP PDU of ``pdu_octets`` (header included)."""
        if pdu_octets <= 0:
            return []
        full, rest = divmod(pdu_octets, self.data_length)
        return [self.data_length] * full + ([rest] if rest else [])

    def payload_packets(self, payload_bytes: int) -> list[int]:
        """LL payload lengths carrying ``payload_bytes`` of protocol data: fragments of
        :attr:`fragment_size`, each with its L2CAP and ATT headers."""
        if payload_bytes < 0:
            msg = f"payload of {payload_bytes} bytes"
            raise ValueError(msg)
        packets: list[int] = []
        size = self.fragment_size
        for start in range(0, payload_bytes, size):
            packets += self.ll_packets(min(size, payload_bytes - start) + PDU_OVERHEAD)
        return packets

    def event_offsets(self, packets: Sequence[int]) -> list[float]:
        """For packets sent in one event, seconds from the anchor to the end of each."""
        offsets: list[float] = []
        elapsed = 0.0
        for length in packets:
            offsets.append(elapsed + self.packet_airtime(length))
            elapsed += self.packet_slot(length)
        return offsets

    def _events(self, packets: Sequence[int]) -> tuple[int, float]:
        """Events ``packets`` need, and the offset in the last one when the last ends."""
        per_event = self.packets_per_interval
        events = math.ceil(len(packets) / per_event)
        last = packets[(events - 1) * per_event :]
        return events, self.event_offsets(last)[-1]

    # -- bounds --------------------------------------------------------------------------

    def payload_throughput(self) -> float:
        """Protocol payload bytes per second in one direction, streaming full fragments
        (notifications or writes without response): the physical bound."""
        size = self.fragment_size
        packets = len(self.ll_packets(size + PDU_OVERHEAD))
        return size * self.packets_per_interval / (packets * self.connection_interval)

    def transfer_time(self, payload_bytes: int) -> float:
        """Seconds from the first connection event to the last packet of ``payload_bytes``
        sent one way, fragment after fragment without waiting for answers."""
        packets = self.payload_packets(payload_bytes)
        if not packets:
            return 0.0
        events, offset = self._events(packets)
        return (events - 1) * self.connection_interval + offset

    def session_time(
        self, exchanges: Sequence[tuple[int, int]], *, terminate: bool = False
    ) -> float:
        """Seconds for round trips of (bytes out, bytes in) once connected: the central
        sends its bytes, the device answers from the next event on, the next round trip
        starts in the event after the answer. A direction with 0 bytes sends nothing.

        With ``terminate``, until the connection is over and its slot free: the central's
        LL_TERMINATE_IND goes out in the event after the last answer and counts once the
        device has acknowledged it.
        """
        event = 0  # index of the next event data may go out in
        end = 0.0
        for out_bytes, in_bytes in exchanges:
            for payload in (out_bytes, in_bytes):
                packets = self.payload_packets(payload)
                if not packets:
                    continue
                events, offset = self._events(packets)
                end = (event + events - 1) * self.connection_interval + offset
                event += events
        if terminate:
            end = event * self.connection_interval + self.packet_slot(LL_TERMINATE_OCTETS) - T_IFS
        return end

    def expected_advert_wait(self) -> float:
        """Expected seconds from starting to initiate until the target's next advert: the
        initiator starts at a random phase of the advertising interval."""
        return self.advertising_interval / 2

    def expected_connect_time(self) -> float:
        """Expected seconds from starting to initiate to the first data event."""
        return self.expected_advert_wait() + self.connection_setup

    def worst_connect_time(self) -> float:
        """Longest seconds from starting to initiate to the first data event (advDelay
        ignored: the virtual radio advertises at the exact interval)."""
        return self.advertising_interval + self.connection_setup


def sequence_bound(
    timing: BleTiming,
    sessions: int,
    slots: int,
    session: float,
    *,
    initiator: Initiator = "any",
) -> float:
    """Expected seconds a central with ``slots`` connections needs for ``sessions``
    sessions of ``session`` seconds each once connected (e.g. :meth:`BleTiming.session_time`),
    one per device.

    Two limits, the larger wins:

    * the initiator: connections are set up one at a time (Core Vol 4 Part E 7.8.12), each
      waiting for an advert and then the connection set-up, and the last one's session
      follows. With ``initiator="any"`` the central connects to whichever device still
      waiting advertises first (Initiator_Filter_Policy 1, the filter accept list holding
      them): with ``m`` devices at random phases the first advert comes after
      ``interval / (m + 1)`` on average. With ``"targeted"`` it names one device per
      connection and waits half an interval on average
      (:meth:`BleTiming.expected_advert_wait`), as a central that picks devices without
      regard to their advertising phase does;
    * the slots: a slot, once free, waits for an advert before its next connection can be
      set up, so it serves its sessions one after another as advert wait, set-up and
      ``session`` (which should include the termination, see :meth:`BleTiming.session_time`);
      with sessions of equal length the slots take the connections in turn, the i-th
      connection falling to slot ``i mod slots``.

    The advert waits are expectations (the phases are random), so a measurement can come
    out slightly below; everything else is a lower bound.
    """
    if sessions < 0:
        msg = f"sessions must not be negative, not {sessions}"
        raise ValueError(msg)
    if slots < 1:
        msg = f"slots must be at least 1, not {slots}"
        raise ValueError(msg)
    if session < 0:
        msg = f"session must not be negative, not {session}"
        raise ValueError(msg)
    if initiator not in ("any", "targeted"):
        msg = f"initiator must be 'any' or 'targeted', not {initiator!r}"
        raise ValueError(msg)
    if sessions == 0:
        return 0.0
    interval, setup = timing.advertising_interval, timing.connection_setup
    if initiator == "targeted":
        waits = [timing.expected_advert_wait()] * sessions
    else:
        waits = [interval / (waiting + 1) for waiting in range(sessions, 0, -1)]
    by_initiator = sum(waits) + sessions * setup + session
    by_slots = max(
        sum(waits[slot::slots]) + len(waits[slot::slots]) * (setup + session)
        for slot in range(min(slots, sessions))
    )
    return max(by_initiator, by_slots)


def exchanges_from_trace(pdus: Iterable[tuple[bool, int]]) -> list[tuple[int, int]]:
    """Round trips for :meth:`BleTiming.session_time` from a connection's L2CAP PDUs, in
    order, each ``(from_central, octets with the L2CAP header)``.

    A run of PDUs in one direction is one side of a round trip. Each PDU counts its octets
    beyond the L2CAP and ATT headers, and at least one, so that a bare ATT response (a Write
    Response is one octet) still takes a packet. Packing a run's PDUs together never needs
    more packets than sending them apart, so the result stays a lower bound.
    """
    exchanges: list[tuple[int, int]] = []
    out_bytes = in_bytes = 0
    for from_central, octets in pdus:
        payload = max(1, octets - PDU_OVERHEAD)
        if from_central:
            if in_bytes:
                exchanges.append((out_bytes, in_bytes))
                out_bytes = in_bytes = 0
            out_bytes += payload
        else:
            in_bytes += payload
    if out_bytes or in_bytes:
        exchanges.append((out_bytes, in_bytes))
    return exchanges


TYPICAL_LOCK: Final = BleTiming(
    phy="1M",
    connection_interval=0.030,
    packets_per_event=4,
    data_length=27,
    att_mtu=247,
    connection_setup=TRANSMIT_WINDOW_DELAY + 0.030,
    advertising_interval=1.0,
)
"""A battery lock: LE 1M, 30 ms interval, no Data Length Extension, 4 packets per event,
MTU 247, first data event at most one interval after the transmit window delay, an advert
a second."""

BEST_CASE: Final = BleTiming(
    phy="2M",
    connection_interval=0.0075,
    packets_per_event=5,
    data_length=251,
    att_mtu=517,
    connection_setup=TRANSMIT_WINDOW_DELAY + 0.0075,
    advertising_interval=0.1,
)
"""The fastest link: LE 2M, 7.5 ms interval, DLE 251, MTU 517; 5 full packets fill the
interval. Adverts every 100 ms (the spec allows 20 ms; 100 ms is what a mains-powered
device would use, and what the simulator uses by default)."""

TIMINGS: Final[dict[str, BleTiming]] = {"typical": TYPICAL_LOCK, "best": BEST_CASE}
"""The models by name, as the command line offers them."""
