"""The device's authorisation state: applying updates, pruning and key decisions."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.access import (
    AccessState,
    Activation,
    Decision,
    apply_update,
    decide,
    from_json,
    local_weekday_and_minute,
    prune,
    to_json,
)
from protocols.enums import Reason
from protocols.envelopes import (
    AccessEntry,
    AuthorisationUpdate,
    RevocationEntry,
    Role,
    ScheduleWindow,
    Scope,
    Target,
    UpdateKind,
    decode_update,
    encode_update,
    issue_certificate,
    sign_update,
    verify_update,
)
from protocols.errors import DecodeError, ErrorCode, LocalProtocolError, UpdateRefused

SETTINGS = settings(max_examples=200, deadline=None)

DEVICE = bytes.fromhex("d1d2d3d4d5d6d7d8")
SITE = 42

# Monday 2025-06-02 00:00 UTC; every test time is an offset from it.
MONDAY = int(datetime(2025, 6, 2, tzinfo=UTC).timestamp())
DAY = 86_400
HOUR = 3_600
MINUTE = 60

WEEKDAYS_9_TO_17 = ScheduleWindow(0b0011111, 9 * 60, 17 * 60)
KEY = 1001
ENTRY = AccessEntry(KEY, MONDAY - DAY, MONDAY + 30 * DAY, (WEEKDAYS_9_TO_17,))
NOW = MONDAY + 10 * HOUR  # Monday 10:00 UTC, inside the window
ACTIVATION = Activation(KEY, NOW + 8 * HOUR)


def state_with(
    entries: tuple[AccessEntry, ...] = (ENTRY,),
    revoked: tuple[RevocationEntry, ...] = (),
    access_version: int = 1,
    revocation_version: int = 0,
) -> AccessState:
    return AccessState(
        access_version=access_version,
        revocation_version=revocation_version,
        entries={entry.key_id: entry for entry in entries},
        revoked={entry.key_id: entry for entry in revoked},
    )


def ask(state: AccessState, **changes: Any) -> Decision:
    arguments: dict[str, Any] = {"key_id": KEY, "activation": ACTIVATION, "now": NOW}
    arguments.update(changes)
    return decide(state, **arguments)


# --------------------------------------------------------------------------------------
# Decisions: each reason
# --------------------------------------------------------------------------------------


def test_valid_key_is_granted() -> None:
    assert ask(state_with()) == Decision(granted=True, reason=Reason.VALID_KEY)


def test_clock_unset() -> None:
    assert ask(state_with(), now=None) == Decision(False, Reason.CLOCK_UNSET)


def test_clock_unset_comes_first_even_for_revoked_keys() -> None:
    state = state_with(revoked=(RevocationEntry(KEY, NOW + DAY),))
    assert ask(state, now=None).reason is Reason.CLOCK_UNSET


def test_revoked_key() -> None:
    state = state_with(entries=(), revoked=(RevocationEntry(KEY, NOW + DAY),))
    assert ask(state) == Decision(False, Reason.KEY_REVOKED)


def test_revocation_beats_a_valid_entry() -> None:
    state = state_with(revoked=(RevocationEntry(KEY, NOW + DAY),))
    assert ask(state_with()).granted  # the same key, unrevoked, would open
    assert ask(state) == Decision(False, Reason.KEY_REVOKED)


def test_revocation_of_another_key_does_not_matter() -> None:
    state = state_with(revoked=(RevocationEntry(KEY + 1, NOW + DAY),))
    assert ask(state).granted


def test_unknown_key() -> None:
    assert ask(state_with(), key_id=KEY + 1, activation=Activation(KEY + 1, NOW + 1)) == (
        Decision(False, Reason.KEY_UNKNOWN)
    )
    assert ask(AccessState()).reason is Reason.KEY_UNKNOWN


def test_activation_missing() -> None:
    assert ask(state_with(), activation=None) == Decision(False, Reason.ACTIVATION_MISSING)


def test_activation_for_another_key_is_missing() -> None:
    other = Activation(KEY + 1, NOW + HOUR)
    assert ask(state_with(), activation=other).reason is Reason.ACTIVATION_MISSING


def test_activation_expired_at_its_expiry() -> None:
    assert ask(state_with(), activation=Activation(KEY, NOW + 1)).granted
    expired = ask(state_with(), activation=Activation(KEY, NOW))
    assert expired == Decision(False, Reason.ACTIVATION_EXPIRED)


def test_outside_validity_edges() -> None:
    # 10:00 on the first and last valid days, and just outside.
    entry = AccessEntry(KEY, NOW, NOW + 7 * DAY, (WEEKDAYS_9_TO_17,))
    state = state_with(entries=(entry,))
    far = Activation(KEY, NOW + 30 * DAY)
    assert ask(state, activation=far, now=NOW).granted
    assert ask(state, activation=far, now=NOW - 1).reason is Reason.OUTSIDE_VALIDITY
    assert ask(state, activation=far, now=NOW + 7 * DAY - 1).granted
    assert ask(state, activation=far, now=NOW + 7 * DAY) == Decision(False, Reason.OUTSIDE_VALIDITY)


def test_outside_schedule() -> None:
    saturday = NOW + 5 * DAY
    state = state_with(entries=(AccessEntry(KEY, MONDAY, MONDAY + 30 * DAY, (WEEKDAYS_9_TO_17,)),))
    assert ask(state, now=saturday, activation=Activation(KEY, saturday + 1)) == Decision(
        False, Reason.OUTSIDE_SCHEDULE
    )


def test_order_of_checks() -> None:
    # Every failing condition at once, removed one at a time, reveals the next reason.
    revoked = (RevocationEntry(KEY, NOW + DAY),)
    outside = AccessEntry(KEY, NOW + DAY, NOW + 2 * DAY, (ScheduleWindow(0b1000000, 0, 1),))
    assert ask(state_with(revoked=revoked), now=None).reason is Reason.CLOCK_UNSET
    assert ask(state_with(entries=(outside,), revoked=revoked), activation=None).reason is (
        Reason.KEY_REVOKED
    )
    assert ask(state_with(entries=()), activation=None).reason is Reason.KEY_UNKNOWN
    assert ask(state_with(entries=(outside,)), activation=None).reason is (
        Reason.ACTIVATION_MISSING
    )
    assert ask(state_with(entries=(outside,)), activation=Activation(KEY, NOW)).reason is (
        Reason.ACTIVATION_EXPIRED
    )
    assert ask(state_with(entries=(outside,))).reason is Reason.OUTSIDE_VALIDITY
    in_validity = AccessEntry(KEY, NOW, NOW + DAY, outside.windows)
    assert ask(state_with(entries=(in_validity,))).reason is Reason.OUTSIDE_SCHEDULE


def test_decision_invariant() -> None:
    with pytest.raises(LocalProtocolError):
        Decision(granted=True, reason=Reason.KEY_REVOKED)
    with pytest.raises(LocalProtocolError):
        Decision(granted=False, reason=Reason.VALID_KEY)


# --------------------------------------------------------------------------------------
# Schedules and local time
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "granted"),
    [
        (9 * HOUR - 1, False),  # 08:59:59
        (9 * HOUR, True),  # 09:00: start is inclusive
        (17 * HOUR - 1, True),  # 16:59:59
        (17 * HOUR, False),  # 17:00: end is exclusive
    ],
)
def test_window_edges(offset: int, granted: bool) -> None:
    now = MONDAY + offset
    decision = ask(state_with(), now=now, activation=Activation(KEY, now + 1))
    assert decision.granted is granted
    if not granted:
        assert decision.reason is Reason.OUTSIDE_SCHEDULE


def test_window_up_to_midnight_and_from_midnight() -> None:
    # A night shift split in two: Monday 22:00-24:00 and Tuesday 00:00-06:00.
    entry = AccessEntry(
        KEY,
        MONDAY,
        MONDAY + 7 * DAY,
        (ScheduleWindow(0b0000001, 22 * 60, 1440), ScheduleWindow(0b0000010, 0, 6 * 60)),
    )
    state = state_with(entries=(entry,))

    def opens(now: int) -> bool:
        return ask(state, now=now, activation=Activation(KEY, now + 1)).granted

    assert not opens(MONDAY + 22 * HOUR - 1)
    assert opens(MONDAY + 22 * HOUR)
    assert opens(MONDAY + DAY - 1)  # Monday 23:59:59
    assert opens(MONDAY + DAY)  # Tuesday 00:00
    assert opens(MONDAY + DAY + 6 * HOUR - 1)
    assert not opens(MONDAY + DAY + 6 * HOUR)
    assert not opens(MONDAY + 2 * DAY)  # Wednesday 00:00
    assert not opens(MONDAY + 7 * DAY - 1)  # Sunday 23:59:59


def test_epoch_was_a_thursday() -> None:
    assert local_weekday_and_minute(0) == (3, 0)
    assert local_weekday_and_minute(4 * DAY) == (0, 0)  # 1970-01-05, a Monday
    assert local_weekday_and_minute(3 * DAY + DAY - 1) == (6, 1439)  # Sunday 23:59
    assert local_weekday_and_minute(MONDAY + 10 * HOUR + 30 * MINUTE) == (0, 630)


def test_local_offset_moves_the_day() -> None:
    thursday_2330 = 23 * HOUR + 30 * MINUTE
    assert local_weekday_and_minute(thursday_2330, 60) == (4, 30)  # Friday 00:30
    assert local_weekday_and_minute(0, -60) == (2, 23 * 60)  # Wednesday 23:00
    assert local_weekday_and_minute(0, 1439) == (3, 1439)


def test_local_offset_applies_to_schedule_only() -> None:
    # 08:30 UTC is 10:30 at UTC+2: inside the window locally, not in UTC.
    now = MONDAY + 8 * HOUR + 30 * MINUTE
    activation = Activation(KEY, now + 1)
    assert ask(state_with(), now=now, activation=activation).reason is Reason.OUTSIDE_SCHEDULE
    assert ask(state_with(), now=now, activation=activation, local_offset_minutes=120).granted


@pytest.mark.parametrize("offset", [1440, -1440, 10_000])
def test_local_offset_out_of_range(offset: int) -> None:
    with pytest.raises(LocalProtocolError):
        local_weekday_and_minute(0, offset)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(-14 * 60, 14 * 60))
def test_local_time_matches_datetime(now: int, offset: int) -> None:
    local = datetime.fromtimestamp(now, tz=timezone(timedelta(minutes=offset)))
    expected = (local.weekday(), local.hour * 60 + local.minute)
    assert local_weekday_and_minute(now, offset) == expected


# --------------------------------------------------------------------------------------
# Applying updates
# --------------------------------------------------------------------------------------


def entry(key: int, until: int = MONDAY + 30 * DAY) -> AccessEntry:
    return AccessEntry(key, MONDAY - DAY, until, (WEEKDAYS_9_TO_17,))


def update(kind: UpdateKind, version: int, **fields: Any) -> AuthorisationUpdate:
    return AuthorisationUpdate(
        kind,
        Target.device(DEVICE),
        version=version,
        base_version=fields.pop("base_version", 0),
        issued_at=NOW - HOUR,
        expires_at=NOW + DAY,
        **fields,
    )


def test_full_replaces_access_list() -> None:
    state = state_with(entries=(entry(1), entry(2)), access_version=1)
    new = apply_update(state, update(UpdateKind.ACCESS_FULL, 2, access=(entry(3),)))
    assert dict(new.entries) == {3: entry(3)}
    assert new.access_version == 2
    assert new.revocation_version == state.revocation_version
    assert state.entries.keys() == {1, 2}  # the old state is untouched


def test_full_on_empty_state() -> None:
    new = apply_update(AccessState(), update(UpdateKind.ACCESS_FULL, 1, access=(entry(1),)))
    assert new == state_with(entries=(entry(1),), access_version=1)


def test_delta_adds_replaces_and_removes() -> None:
    state = state_with(entries=(entry(1), entry(2), entry(3)), access_version=4)
    replaced = entry(2, until=MONDAY + 2 * DAY)
    delta = update(
        UpdateKind.ACCESS_DELTA,
        5,
        base_version=4,
        access=(replaced, entry(9)),
        removed_keys=(3, 77),  # removing an absent key is harmless
    )
    new = apply_update(state, delta)
    assert dict(new.entries) == {1: entry(1), 2: replaced, 9: entry(9)}
    assert new.access_version == 5


def test_delta_for_another_base_is_refused() -> None:
    state = state_with(access_version=4)
    delta = update(UpdateKind.ACCESS_DELTA, 6, base_version=5, access=(entry(9),))
    with pytest.raises(LocalProtocolError) as info:
        apply_update(state, delta)
    assert info.value.code is ErrorCode.UPDATE_BASE_MISMATCH


def test_revocation_replaces_revoked_set_only() -> None:
    state = state_with(revoked=(RevocationEntry(5, NOW),), revocation_version=2)
    revocations = (RevocationEntry(6, NOW + DAY), RevocationEntry(KEY, NOW + DAY))
    new = apply_update(state, update(UpdateKind.REVOCATION, 3, revocations=revocations))
    assert dict(new.revoked) == {6: revocations[0], KEY: revocations[1]}
    assert new.revocation_version == 3
    assert new.entries == state.entries
    assert new.access_version == state.access_version
    assert ask(new).reason is Reason.KEY_REVOKED


@pytest.mark.parametrize(
    "stale",
    [
        update(UpdateKind.ACCESS_FULL, 4, access=(entry(1),)),
        update(UpdateKind.ACCESS_FULL, 3, access=(entry(1),)),
        update(UpdateKind.ACCESS_DELTA, 4, base_version=3),
        update(UpdateKind.REVOCATION, 2),
    ],
)
def test_apply_refuses_rollback(stale: AuthorisationUpdate) -> None:
    state = state_with(access_version=4, revocation_version=2)
    with pytest.raises(LocalProtocolError) as info:
        apply_update(state, stale)
    assert info.value.code is ErrorCode.UPDATE_ROLLBACK


def test_access_and_revocation_versions_are_independent() -> None:
    state = AccessState()
    state = apply_update(state, update(UpdateKind.REVOCATION, 7))
    state = apply_update(state, update(UpdateKind.ACCESS_FULL, 1, access=(entry(1),)))
    state = apply_update(state, update(UpdateKind.ACCESS_DELTA, 2, base_version=1))
    assert (state.access_version, state.revocation_version) == (2, 7)


# --------------------------------------------------------------------------------------
# Pruning
# --------------------------------------------------------------------------------------


def test_prune_drops_only_after_prune_after() -> None:
    revocation = RevocationEntry(5, NOW)
    state = state_with(entries=(), revoked=(revocation,))
    assert prune(state, NOW) is state  # at prune_after it is still kept
    assert dict(prune(state, NOW + 1).revoked) == {}


def test_prune_keeps_other_revocations_and_versions() -> None:
    keep = RevocationEntry(6, NOW + DAY)
    state = state_with(
        revoked=(RevocationEntry(5, NOW - 1), keep), access_version=3, revocation_version=9
    )
    pruned = prune(state, NOW)
    assert dict(pruned.revoked) == {6: keep}
    assert (pruned.access_version, pruned.revocation_version) == (3, 9)
    assert pruned.entries == state.entries


def test_prune_never_resurrects_a_key_with_a_live_entry() -> None:
    # prune_after wrongly set before the key's validity ends: the revocation stays.
    state = state_with(revoked=(RevocationEntry(KEY, NOW - DAY),))
    assert prune(state, NOW) is state
    assert ask(prune(state, NOW)).reason is Reason.KEY_REVOKED
    after = ENTRY.valid_until
    assert dict(prune(state, after).revoked) == {}


# --------------------------------------------------------------------------------------
# State integrity
# --------------------------------------------------------------------------------------


def test_state_is_a_frozen_copy() -> None:
    entries = {KEY: ENTRY}
    state = AccessState(entries=entries)
    entries[7] = entry(7)
    assert set(state.entries) == {KEY}
    with pytest.raises(TypeError):
        state.entries[7] = entry(7)  # type: ignore[index]  # the mapping is read-only
    assert state == AccessState(entries={KEY: ENTRY})
    assert hash(state) == hash(AccessState(entries={KEY: ENTRY}))
    assert AccessState() == AccessState()


@pytest.mark.parametrize(
    "build",
    [
        lambda: AccessState(entries={KEY + 1: ENTRY}),
        lambda: AccessState(revoked={5: RevocationEntry(6, 0)}),
        lambda: AccessState(access_version=-1),
        lambda: AccessState(revocation_version=2**32),
        lambda: AccessState(access_version=True),
    ],
)
def test_state_is_validated(build: Any) -> None:
    with pytest.raises(LocalProtocolError):
        build()


# --------------------------------------------------------------------------------------
# JSON persistence
# --------------------------------------------------------------------------------------


windows = st.builds(
    lambda days, start, length: ScheduleWindow(days, start, min(1440, start + length)),
    st.integers(1, 127),
    st.integers(0, 1439),
    st.integers(1, 1440),
)
entries = st.builds(
    lambda key, start, length, ws: AccessEntry(key, start, min(2**32 - 1, start + length), ws),
    st.integers(1, 2**32 - 1),
    st.integers(0, 2**32 - 2),
    st.integers(1, 2**32),
    st.lists(windows, min_size=1, max_size=8).map(tuple),
)
revocations = st.builds(RevocationEntry, st.integers(1, 2**32 - 1), st.integers(0, 2**32 - 1))
states = st.builds(
    lambda av, rv, es, rs: AccessState(
        av, rv, {e.key_id: e for e in es}, {r.key_id: r for r in rs}
    ),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.lists(entries, max_size=5),
    st.lists(revocations, max_size=5),
)


@SETTINGS
@given(states)
def test_json_round_trip(state: AccessState) -> None:
    text = to_json(state)
    assert from_json(text) == state
    assert from_json(text.encode()) == state
    assert to_json(from_json(text)) == text


def _document(**changes: Any) -> str:
    document = json.loads(to_json(state_with(revoked=(RevocationEntry(5, NOW),))))
    document.update(changes)
    return json.dumps(document)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        "null",
        "[" * 100_000,
        _document(format="1"),
        _document(access_version=True),
        _document(access_version=-1),
        _document(revocation_version=1.5),
        _document(entries={}),
        _document(entries=[{"key_id": KEY}]),
        _document(entries=[json.loads(to_json(state_with()))["entries"][0]] * 2),
        _document(revoked=[{"key_id": 5, "prune_after": NOW}] * 2),
        _document(revoked=[{"key_id": 0, "prune_after": NOW}]),
        _document(entries=[{"key_id": 1, "valid_from": 0, "valid_until": 1, "windows": [[1, 0]]}]),
        _document(
            entries=[{"key_id": 1, "valid_from": 0, "valid_until": 1, "windows": [[1, 0, True]]}]
        ),
        _document(entries=[{"key_id": 1, "valid_from": 0, "valid_until": 1, "windows": []}]),
        _document(entries=[{"key_id": 1, "valid_from": 0, "valid_until": 1, "windows": [7]}]),
        '{"format": 1, "access_version": 1' + "0" * 5000 + "}",
    ],
)
def test_from_json_refuses(text: str) -> None:
    with pytest.raises(DecodeError):
        from_json(text)


def test_from_json_refuses_other_format_version() -> None:
    with pytest.raises(DecodeError) as info:
        from_json(_document(format=2))
    assert info.value.code is ErrorCode.UNSUPPORTED_VERSION


def test_from_json_refuses_invalid_utf8() -> None:
    with pytest.raises(DecodeError):
        from_json(b"\xff\xfe{")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_random_text_into_from_json(text: str) -> None:
    with contextlib.suppress(DecodeError):
        from_json(text)


# --------------------------------------------------------------------------------------
# End to end: verify, apply, decide
# --------------------------------------------------------------------------------------


def test_verified_updates_drive_decisions() -> None:
    authority = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    gateway = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
    cert = issue_certificate(
        authority,
        role=Role.GATEWAY,
        subject="gateway-01",
        serial=1,
        signing_key=gateway.public_key(),
        noise_key=X25519PrivateKey.from_private_bytes(bytes(range(64, 96))).public_key(),
        scope=Scope(sites=frozenset({SITE})),
        not_before=MONDAY - DAY,
        not_after=MONDAY + 365 * DAY,
    )
    state = AccessState()

    def receive(new: AuthorisationUpdate) -> AccessState:
        wire = encode_update(sign_update(new, key=gateway, certificate=cert))
        verified = verify_update(
            decode_update(wire),
            authority_key=authority.public_key(),
            device_id=DEVICE,
            site_id=SITE,
            now=NOW,
            access_version=state.access_version,
            revocation_version=state.revocation_version,
        )
        return apply_update(state, verified)

    state = receive(update(UpdateKind.ACCESS_FULL, 1, access=(ENTRY,)))
    assert ask(state).granted
    state = receive(update(UpdateKind.REVOCATION, 1, revocations=(RevocationEntry(KEY, NOW),)))
    assert ask(state).reason is Reason.KEY_REVOKED
    # Replaying the first access list cannot undo anything.
    with pytest.raises(UpdateRefused) as info:
        receive(update(UpdateKind.ACCESS_FULL, 1, access=(ENTRY,)))
    assert info.value.code is ErrorCode.UPDATE_ROLLBACK
    state = receive(update(UpdateKind.ACCESS_DELTA, 2, base_version=1, removed_keys=(KEY,)))
    assert ask(state).reason is Reason.KEY_REVOKED
    assert ask(prune(state, NOW + 1)).reason is Reason.KEY_UNKNOWN
