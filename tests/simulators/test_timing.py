"""The BLE timing model's arithmetic, against values worked out by hand."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from bumble import hci

from simulators.radio import _cap_att_mtu, _PacedConnection
from simulators.timing import (
    BEST_CASE,
    TYPICAL_LOCK,
    BleTiming,
    exchanges_from_trace,
    sequence_bound,
)

US = 1e-6


def test_airtime_of_packets_on_each_phy() -> None:
    # 1M: preamble 1 + access address 4 + header 2 + payload + CRC 3 octets, 8 us each.
    assert TYPICAL_LOCK.packet_airtime(27) == pytest.approx(296 * US)
    assert TYPICAL_LOCK.packet_airtime(0) == pytest.approx(80 * US)
    # 2M: preamble 2, 4 us an octet.
    assert BEST_CASE.packet_airtime(251) == pytest.approx(1048 * US)
    assert BEST_CASE.packet_airtime(0) == pytest.approx(44 * US)
    # Encrypted: a 4-octet MIC on non-empty packets only.
    encrypted = dataclasses.replace(TYPICAL_LOCK, encrypted=True)
    assert encrypted.packet_airtime(27) == pytest.approx(328 * US)
    assert encrypted.packet_airtime(0) == pytest.approx(80 * US)


def test_packet_slot_includes_both_inter_frame_spaces_and_the_empty_acknowledgement() -> None:
    assert TYPICAL_LOCK.packet_slot(27) == pytest.approx((296 + 150 + 80 + 150) * US)
    assert BEST_CASE.packet_slot(251) == pytest.approx((1048 + 150 + 44 + 150) * US)


def test_packets_per_interval_is_capped_by_what_fits() -> None:
    assert TYPICAL_LOCK.packets_per_interval == 4
    assert BEST_CASE.packets_per_interval == 5  # 7500 us // 1392 us
    greedy = dataclasses.replace(BEST_CASE, packets_per_event=20)
    assert greedy.packets_per_interval == 5


def test_fragments_are_split_into_ll_packets_with_their_headers() -> None:
    # MTU 247: fragments of 244 octets; + 4 (L2CAP) + 3 (ATT) = 251 = 9 x 27 + 8.
    assert TYPICAL_LOCK.fragment_size == 244
    assert TYPICAL_LOCK.payload_packets(244) == [27] * 9 + [8]
    assert TYPICAL_LOCK.payload_packets(245) == [27] * 9 + [8] + [8]
    # MTU 517: fragments of 512 (the attribute value limit), 519 = 251 + 251 + 17.
    assert BEST_CASE.fragment_size == 512
    assert BEST_CASE.payload_packets(512) == [251, 251, 17]
    assert TYPICAL_LOCK.payload_packets(0) == []


def test_payload_throughput() -> None:
    # 244 bytes per 10 packets, 4 packets per 30 ms.
    assert TYPICAL_LOCK.payload_throughput() == pytest.approx(244 * 4 / (10 * 0.030))
    # 512 bytes per 3 packets, 5 packets per 7.5 ms.
    assert BEST_CASE.payload_throughput() == pytest.approx(512 * 5 / (3 * 0.0075))


def test_transfer_time() -> None:
    assert TYPICAL_LOCK.transfer_time(0) == 0.0
    # One 8-octet packet in the first event.
    assert TYPICAL_LOCK.transfer_time(1) == pytest.approx(144 * US)
    # 10 packets at 4 per event: 3 events; the last holds a 27 and an 8 octet packet.
    assert TYPICAL_LOCK.transfer_time(244) == pytest.approx(2 * 0.030 + (676 + 144) * US)
    # 2M, 3 packets in one event: two slots of 251, then 2 + 4 + 2 + 17 + 3 = 28 octets.
    assert BEST_CASE.transfer_time(512) == pytest.approx((2 * 1392 + 28 * 4) * US)


def test_session_time_answers_in_the_next_event() -> None:
    assert TYPICAL_LOCK.session_time([]) == 0.0
    assert TYPICAL_LOCK.session_time([(1, 1)]) == pytest.approx(0.030 + 144 * US)
    assert TYPICAL_LOCK.session_time([(1, 1), (1, 1)]) == pytest.approx(0.090 + 144 * US)
    # 3 events out, then one 8-octet packet back in the fourth.
    assert TYPICAL_LOCK.session_time([(244, 1)]) == pytest.approx(0.090 + 144 * US)
    # Nothing out: the answer goes in the first event.
    assert TYPICAL_LOCK.session_time([(0, 1)]) == pytest.approx(144 * US)


def test_sequence_bound_takes_the_busier_of_initiator_and_slots() -> None:
    # Targeted, initiator: 200 x (0.5 s advert wait + 31.25 ms set-up) + the last session.
    assert sequence_bound(TYPICAL_LOCK, 200, 5, 1.0, initiator="targeted") == pytest.approx(107.25)
    # Targeted, slots: 2 sessions each of 50 ms advert wait + 8.75 ms set-up + 1 s.
    assert sequence_bound(BEST_CASE, 10, 5, 1.0, initiator="targeted") == pytest.approx(2.1175)
    # Any: waits of 1/4, 1/3, 1/2 s for 3 devices; initiator 13/12 + 3 x 31.25 ms + 1 s.
    # Slots (1 slot): every wait, then 3 x 1.03125 s = 4.1770833, the larger.
    assert sequence_bound(TYPICAL_LOCK, 3, 1, 1.0) == pytest.approx(13 / 12 + 3 * 1.03125)
    # 3 slots: the busiest slot waits 1/2 s, then 1.03125 s; the initiator's 2.1770833 is more.
    assert sequence_bound(TYPICAL_LOCK, 3, 3, 1.0) == pytest.approx(13 / 12 + 0.09375 + 1.0)
    assert sequence_bound(TYPICAL_LOCK, 0, 5, 1.0) == 0.0


def test_sequence_bound_slots_take_connections_in_turn() -> None:
    # 4 devices, 2 slots: waits 1/5, 1/4, 1/3, 1/2 s; slot 0 takes the 1st and 3rd
    # connection, slot 1 the 2nd and 4th (the busier: 3/4 s of waits and 2 sessions).
    expected = 0.25 + 0.5 + 2 * (0.03125 + 1.0)
    assert sequence_bound(TYPICAL_LOCK, 4, 2, 1.0) == pytest.approx(expected)
    # Fewer sessions than slots: the busiest slot has the last (longest) wait.
    assert sequence_bound(TYPICAL_LOCK, 1, 5, 1.0) == pytest.approx(0.5 + 0.03125 + 1.0)


def test_termination_takes_the_event_after_the_last_answer() -> None:
    # LL_TERMINATE_IND (2 octets: 96 us) + T_IFS + the empty acknowledgement (80 us).
    terminate = (96 + 150 + 80) * US
    assert TYPICAL_LOCK.session_time([], terminate=True) == pytest.approx(terminate)
    # (1, 1): out in event 0, the answer in event 1, the termination in event 2.
    assert TYPICAL_LOCK.session_time([(1, 1)], terminate=True) == pytest.approx(0.060 + terminate)


def test_connect_times() -> None:
    assert TYPICAL_LOCK.expected_connect_time() == pytest.approx(0.5 + 0.03125)
    assert TYPICAL_LOCK.worst_connect_time() == pytest.approx(1.0 + 0.03125)


def test_exchanges_from_a_trace() -> None:
    trace = [(True, 8), (False, 5), (True, 251), (True, 10), (False, 100), (False, 5)]
    assert exchanges_from_trace(trace) == [(1, 1), (247, 94)]
    assert exchanges_from_trace([(False, 20)]) == [(0, 13)]
    assert exchanges_from_trace([]) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"phy": "3M"}, "PHY"),
        ({"connection_interval": 0.005}, "outside 7.5 ms"),
        ({"connection_interval": 0.0076}, "multiple of 1.25 ms"),
        ({"packets_per_event": 0}, "packets per event"),
        ({"data_length": 26}, "data length"),
        ({"att_mtu": 518}, "ATT MTU"),
        ({"connection_setup": -1.0}, "set-up"),
        ({"advertising_interval": 0.01}, "advertising interval"),
    ],
)
def test_parameters_are_validated(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TYPICAL_LOCK, **change)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="LL payload"):
        TYPICAL_LOCK.packet_airtime(28)
    with pytest.raises(ValueError, match="payload"):
        TYPICAL_LOCK.transfer_time(-1)
    with pytest.raises(ValueError, match="slots"):
        sequence_bound(TYPICAL_LOCK, 1, 0, 1.0)
    with pytest.raises(ValueError, match="initiator"):
        sequence_bound(TYPICAL_LOCK, 1, 1, 1.0, initiator="some")  # type: ignore[arg-type]  # refused at run time
    assert isinstance(TYPICAL_LOCK, BleTiming)


def test_timed_link_places_packets_in_connection_events() -> None:
    central = hci.Address("C0:00:00:00:00:01")
    paced = _PacedConnection(anchor=100.0)
    # A full fragment (251 octets: 10 packets) handed over before the first event: events
    # 0, 1 and 2; it is through with the 8-octet packet after one 27-octet slot of event 2.
    when = paced.schedule(TYPICAL_LOCK, central, 251, now=99.0)
    assert when == pytest.approx(100.0 + 2 * 0.030 + (676 + 144) * US)
    # The next PDU from the same side joins event 2 (2 of 4 packets used): after the slots
    # of the 27 and the 8-octet packets (676 + 524 us), 15 octets take 120 us.
    when = paced.schedule(TYPICAL_LOCK, central, 5, now=99.5)
    assert when == pytest.approx(100.0 + 2 * 0.030 + (676 + 524 + 120) * US)
    # Handed over just after an event started: the next event.
    when = paced.schedule(TYPICAL_LOCK, central, 5, now=100.0 + 3 * 0.030 + 1e-4)
    assert when == pytest.approx(100.0 + 4 * 0.030 + 120 * US)


def test_timed_link_caps_the_att_mtu() -> None:
    request = bytes([3, 0, 4, 0, 0x02]) + (517).to_bytes(2, "little")
    assert _cap_att_mtu(request, 247) == bytes([3, 0, 4, 0, 0x02]) + (247).to_bytes(2, "little")
    small = bytes([3, 0, 4, 0, 0x03]) + (185).to_bytes(2, "little")
    assert _cap_att_mtu(small, 247) == small
    write = bytes([3, 0, 4, 0, 0x12, 1, 0])
    assert _cap_att_mtu(write, 23) == write
