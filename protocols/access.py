"""A device's authorisation state and its decision whether a staff key may open.

The simulated lock (and any firmware port) decides here, so the rule lives in one
place. The state holds the access list and the revocation list, each with the version
of the last verified update applied to it. :func:`apply_update` takes an update that
:func:`protocols.envelopes.verify_update` accepted; :func:`decide` answers one key.

Sans-IO: the current time is the parameter ``now`` (unix seconds, ``None`` while the
device's clock is unset); the local weekday and minute come from an explicit offset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from protocols.enums import Reason
from protocols.envelopes import (
    MINUTES_PER_DAY,
    AccessEntry,
    AuthorisationUpdate,
    RevocationEntry,
    ScheduleWindow,
    UpdateKind,
)
from protocols.errors import DecodeError, ErrorCode, LocalProtocolError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "AccessState",
    "Activation",
    "Decision",
    "apply_update",
    "decide",
    "from_json",
    "local_weekday_and_minute",
    "prune",
    "to_json",
]

_U32_MAX: Final = 0xFFFF_FFFF
_SECONDS_PER_DAY: Final = 86400
# 1970-01-01, day 0 of unix time, was a Thursday: weekday 3 with Monday = 0.
_EPOCH_WEEKDAY: Final = 3
# Real UTC offsets lie within -12:00..+14:00; anything a day or more is a bug.
_MAX_OFFSET_MINUTES: Final = MINUTES_PER_DAY - 1
_JSON_FORMAT: Final = 1


def _empty_entries() -> Mapping[int, AccessEntry]:
    return MappingProxyType({})


def _empty_revoked() -> Mapping[int, RevocationEntry]:
    return MappingProxyType({})


def _check_version(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U32_MAX:
        msg = f"{what} must be an integer 0..{_U32_MAX}"
        raise LocalProtocolError(ErrorCode.MALFORMED, msg)


@dataclass(frozen=True)
class AccessState:
    """What a device holds: the access list and the revocation list with their versions.

    ``entries`` maps key id to its access entry, ``revoked`` key id to its revocation.
    Both are read-only copies, so a state can be shared and compared but never changed
    behind the back of the code that verified the updates it came from.
    """

    access_version: int = 0
    revocation_version: int = 0
    entries: Mapping[int, AccessEntry] = field(default_factory=_empty_entries)
    revoked: Mapping[int, RevocationEntry] = field(default_factory=_empty_revoked)

    def __post_init__(self) -> None:
        _check_version(self.access_version, "access_version")
        _check_version(self.revocation_version, "revocation_version")
        entries = dict(self.entries)
        revoked = dict(self.revoked)
        # Keys must agree with the entries they index: decide() looks entries up by key
        # id, and a mismatch would grant or revoke the wrong key.
        for key, entry in entries.items():
            if not isinstance(entry, AccessEntry) or entry.key_id != key:
                msg = "access entries must be AccessEntry values under their own key id"
                raise LocalProtocolError(ErrorCode.MALFORMED, msg)
        for key, revocation in revoked.items():
            if not isinstance(revocation, RevocationEntry) or revocation.key_id != key:
                msg = "revocations must be RevocationEntry values under their own key id"
                raise LocalProtocolError(ErrorCode.MALFORMED, msg)
        # Copy, then freeze: the caller's dicts may change later, this state must not.
        object.__setattr__(self, "entries", MappingProxyType(entries))
        object.__setattr__(self, "revoked", MappingProxyType(revoked))

    def __hash__(self) -> int:
        """Hash by content (mapping proxies themselves are unhashable)."""
        return hash(
            (
                self.access_version,
                self.revocation_version,
                frozenset(self.entries.items()),
                frozenset(self.revoked.items()),
            )
        )


def apply_update(state: AccessState, update: AuthorisationUpdate) -> AccessState:
    """The state after applying ``update``; pure.

    Call only with an update :func:`protocols.envelopes.verify_update` returned for this
    state's versions. As a last guard against a caller that skipped it, an update that
    would roll a list back, or a delta for another base, is refused here too.

    * ``ACCESS_FULL`` replaces the access list;
    * ``ACCESS_DELTA`` drops ``removed_keys``, then adds or replaces ``access`` entries;
    * ``REVOCATION`` replaces the revocation list.
    """
    if update.kind is UpdateKind.REVOCATION:
        if update.version <= state.revocation_version:
            msg = "revocation update does not advance the revocation version"
            raise LocalProtocolError(ErrorCode.UPDATE_ROLLBACK, msg)
        return AccessState(
            access_version=state.access_version,
            revocation_version=update.version,
            entries=state.entries,
            revoked={entry.key_id: entry for entry in update.revocations},
        )
    if update.version <= state.access_version:
        msg = "access update does not advance the access version"
        raise LocalProtocolError(ErrorCode.UPDATE_ROLLBACK, msg)
    if update.kind is UpdateKind.ACCESS_FULL:
        entries = {entry.key_id: entry for entry in update.access}
    else:
        if update.base_version != state.access_version:
            msg = "delta does not apply to the held access version"
            raise LocalProtocolError(ErrorCode.UPDATE_BASE_MISMATCH, msg)
        entries = dict(state.entries)
        for removed in update.removed_keys:
            entries.pop(removed, None)
        entries.update((entry.key_id, entry) for entry in update.access)
    return AccessState(
        access_version=update.version,
        revocation_version=state.revocation_version,
        entries=entries,
        revoked=state.revoked,
    )


def prune(state: AccessState, now: int) -> AccessState:
    """Drop revocations whose ``prune_after`` has passed (``now > prune_after``).

    A revocation is kept, whatever its ``prune_after``, while the device still holds an
    access entry for the key that is valid now or later: dropping it then would bring
    the key back to life. The registry sets ``prune_after`` after the key's validity has
    ended, so this guard only matters if the two lists disagree.
    """

    def still_needed(revocation: RevocationEntry) -> bool:
        if now <= revocation.prune_after:
            return True
        entry = state.entries.get(revocation.key_id)
        return entry is not None and entry.valid_until > now

    revoked = {key: rev for key, rev in state.revoked.items() if still_needed(rev)}
    if len(revoked) == len(state.revoked):
        return state
    return AccessState(
        access_version=state.access_version,
        revocation_version=state.revocation_version,
        entries=state.entries,
        revoked=revoked,
    )


@dataclass(frozen=True)
class Activation:
    """The daily activation a staff key carries (its second factor), until ``expires_at``."""

    key_id: int
    expires_at: int


@dataclass(frozen=True)
class Decision:
    """Whether a key may open, and why; ``granted`` exactly when ``reason`` is VALID_KEY."""

    granted: bool
    reason: Reason

    def __post_init__(self) -> None:
        if self.granted != (self.reason is Reason.VALID_KEY):
            msg = "a decision is granted exactly for VALID_KEY"
            raise LocalProtocolError(ErrorCode.INTERNAL, msg)


def local_weekday_and_minute(now: int, local_offset_minutes: int = 0) -> tuple[int, int]:
    """Local weekday (0 = Monday .. 6 = Sunday) and minute of the day (0..1439) at ``now``.

    ``local_offset_minutes`` is the local time's offset from UTC (e.g. +120 for UTC+2).
    """
    if not -_MAX_OFFSET_MINUTES <= local_offset_minutes <= _MAX_OFFSET_MINUTES:
        msg = "local offset must be less than a day"
        raise LocalProtocolError(ErrorCode.MALFORMED, msg)
    local = now + local_offset_minutes * 60
    # Floor division keeps this right for local times before the epoch, too.
    days, seconds = divmod(local, _SECONDS_PER_DAY)
    return (days + _EPOCH_WEEKDAY) % 7, seconds // 60


def decide(
    state: AccessState,
    *,
    key_id: int,
    activation: Activation | None,
    now: int | None,
    local_offset_minutes: int = 0,
) -> Decision:
    """Whether the staff key ``key_id`` may open now.

    Checked in this order, first failure wins: clock unset (``now`` is None) ->
    CLOCK_UNSET; revoked -> KEY_REVOKED (before anything that could grant, so a
    revocation beats any access entry); no access entry -> KEY_UNKNOWN; no activation
    or one for another key -> ACTIVATION_MISSING; activation expired (``now >=
    expires_at``) -> ACTIVATION_EXPIRED; outside ``valid_from <= now < valid_until`` ->
    OUTSIDE_VALIDITY; no schedule window holds the local weekday and minute ->
    OUTSIDE_SCHEDULE; else granted with VALID_KEY.
    """
    if now is None:
        # Without a trusted clock no validity or schedule can be checked: refuse all.
        return Decision(granted=False, reason=Reason.CLOCK_UNSET)
    if key_id in state.revoked:
        return Decision(granted=False, reason=Reason.KEY_REVOKED)
    entry = state.entries.get(key_id)
    if entry is None:
        return Decision(granted=False, reason=Reason.KEY_UNKNOWN)
    if activation is None or activation.key_id != key_id:
        return Decision(granted=False, reason=Reason.ACTIVATION_MISSING)
    if now >= activation.expires_at:
        return Decision(granted=False, reason=Reason.ACTIVATION_EXPIRED)
    if not entry.valid_from <= now < entry.valid_until:
        return Decision(granted=False, reason=Reason.OUTSIDE_VALIDITY)
    weekday, minute = local_weekday_and_minute(now, local_offset_minutes)
    if not any(window.contains(weekday, minute) for window in entry.windows):
        return Decision(granted=False, reason=Reason.OUTSIDE_SCHEDULE)
    return Decision(granted=True, reason=Reason.VALID_KEY)


# --------------------------------------------------------------------------------------
# JSON persistence (simulators keep their state in files)
# --------------------------------------------------------------------------------------


def to_json(state: AccessState) -> str:
    """A JSON text of ``state``, entries sorted by key id so equal states give equal text."""
    document = {
        "format": _JSON_FORMAT,
        "access_version": state.access_version,
        "revocation_version": state.revocation_version,
        "entries": [
            {
                "key_id": entry.key_id,
                "valid_from": entry.valid_from,
                "valid_until": entry.valid_until,
                "windows": [[w.days, w.start_minute, w.end_minute] for w in entry.windows],
            }
            for _, entry in sorted(state.entries.items())
        ],
        "revoked": [
            {"key_id": rev.key_id, "prune_after": rev.prune_after}
            for _, rev in sorted(state.revoked.items())
        ],
    }
    return json.dumps(document, sort_keys=True, indent=2)


def _field(obj: object, name: str, kind: type) -> Any:
    if not isinstance(obj, dict) or name not in obj:
        msg = f"access state: missing {name}"
        raise DecodeError(msg)
    value = obj[name]
    # JSON true/false are Python bools, which isinstance(..., int) would let through.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        msg = f"access state: {name} has the wrong type"
        raise DecodeError(msg)
    return value


def _int_list(value: object, what: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    ):
        msg = f"access state: {what} must be a list of integers"
        raise DecodeError(msg)
    return value


def from_json(text: str | bytes) -> AccessState:
    """The state :func:`to_json` wrote; anything else is a :class:`DecodeError`."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        msg = "access state: not JSON"
        raise DecodeError(msg) from exc
    try:
        if _field(document, "format", int) != _JSON_FORMAT:
            msg = "access state: unsupported format"
            raise DecodeError(msg, ErrorCode.UNSUPPORTED_VERSION)
        entries: dict[int, AccessEntry] = {}
        for item in _field(document, "entries", list):
            windows = []
            for raw in _field(item, "windows", list):
                days, start, end = _three(_int_list(raw, "window"))
                windows.append(ScheduleWindow(days=days, start_minute=start, end_minute=end))
            entry = AccessEntry(
                key_id=_field(item, "key_id", int),
                valid_from=_field(item, "valid_from", int),
                valid_until=_field(item, "valid_until", int),
                windows=tuple(windows),
            )
            if entry.key_id in entries:
                msg = "access state: duplicate access entry"
                raise DecodeError(msg)
            entries[entry.key_id] = entry
        revoked: dict[int, RevocationEntry] = {}
        for item in _field(document, "revoked", list):
            revocation = RevocationEntry(
                key_id=_field(item, "key_id", int),
                prune_after=_field(item, "prune_after", int),
            )
            if revocation.key_id in revoked:
                msg = "access state: duplicate revocation"
                raise DecodeError(msg)
            revoked[revocation.key_id] = revocation
        return AccessState(
            access_version=_field(document, "access_version", int),
            revocation_version=_field(document, "revocation_version", int),
            entries=entries,
            revoked=revoked,
        )
    except LocalProtocolError as exc:
        msg = f"access state: {exc.message}"
        raise DecodeError(msg) from exc


def _three(values: list[int]) -> tuple[int, int, int]:
    if len(values) != 3:
        msg = "access state: a window is [days, start_minute, end_minute]"
        raise DecodeError(msg)
    return values[0], values[1], values[2]
