"""The daemon's local control socket: what people at the gateway ask of the running daemon.

The radio belongs to the running daemon, so what needs a device while the daemon runs
goes through it: ``lockgw decommission`` (asked of the registry, then done in a radio
slot) and ``lockgw audit pull`` (the device's newest records collected first). The
socket is a Unix stream socket (``[gateway] control_socket``), mode 0660: the daemon's
user and group may use it. Who called is taken from the kernel (``SO_PEERCRED``), not
from the request, and recorded with every audit pull.

One request per connection, one JSON line::

    {"op": "audit_pull", "args": {...}}

answered by any number of progress lines and one final line::

    {"progress": "collecting the newest records from the device"}
    {"ok": true, "result": {...}}
    {"ok": false, "error": {"code": "declined", "message": "...", "details": {...}}}

A client that hangs up (Ctrl-C) abandons its request: the operation is cancelled where it
stands, which each operation allows at any point (see ``ControlServer._unless_abandoned``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Self

import structlog

from gateway import audit
from gateway.handlers import (
    LOG_VERIFICATION_FAILED,
    NOT_FOUND,
    CommandHandler,
    Progress,
    RequestError,
)
from gateway.pipeline import LogCollectionError
from protocols.errors import ProtocolError
from protocols.identity import format_device_id, parse_device_id

if TYPE_CHECKING:
    from types import TracebackType

log = structlog.get_logger(__name__)

MAX_REQUEST: Final = 16 * 1024
"""Largest request line accepted, in bytes."""
READ_TIMEOUT: Final = 10.0
"""Seconds a client has to send its request after connecting."""
SOCKET_MODE: Final = 0o660
BAD_REQUEST: Final = "bad_request"
UNAVAILABLE: Final = "unavailable"
INTERNAL: Final = "internal"
DECOMMISSION_TIMEOUT: Final = 60.0
"""Default seconds a technician's decommission waits for the registry's answer."""


class ControlError(RequestError):
    """A request the daemon refused or could not carry out; ``code`` is machine-readable.

    The handler's own refusals (:class:`~gateway.handlers.RequestError`) reach the client
    the same way."""


@dataclass(frozen=True, slots=True)
class Caller:
    """The local user on the other end of the socket, as the kernel reports it."""

    uid: int
    pid: int

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"

    @classmethod
    def of(cls, sock: socket.socket) -> Caller:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        return cls(uid=uid, pid=pid)


Operation = Callable[[Mapping[str, Any], Caller, Progress], Awaitable[dict[str, Any]]]


class ControlServer:
    """Serves :data:`Operation` s on a Unix socket while entered."""

    def __init__(self, path: Path, operations: Mapping[str, Operation]) -> None:
        self.path = path
        self.operations = dict(operations)
        self._server: asyncio.Server | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._remove_stale()
        self._server = await asyncio.start_unix_server(
            self._serve, path=os.fspath(self.path), limit=MAX_REQUEST
        )
        self.path.chmod(SOCKET_MODE)
        log.info("control_socket_listening", path=str(self.path))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(OSError):
                self.path.unlink()
            for task in list(self._running):
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    def _remove_stale(self) -> None:
        """A socket file left by a killed daemon is removed; a live daemon's is not."""
        if not self.path.is_socket():
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(os.fspath(self.path))
        except OSError:
            self.path.unlink()
            return
        finally:
            probe.close()
        msg = f"another daemon listens on {self.path}"
        raise OSError(msg)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._running.add(task)
        try:
            await self._answer(reader, writer)
        finally:
            self._running.discard(task)
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(document: Mapping[str, Any]) -> None:
            if not writer.is_closing():
                writer.write(json.dumps(document, separators=(",", ":")).encode() + b"\n")

        try:
            caller = Caller.of(writer.get_extra_info("socket"))
            op, args = await self._read(reader)
            operation = self.operations.get(op)
            if operation is None:
                raise ControlError(BAD_REQUEST, f"no operation {op!r}")
            log.info("control_request", op=op, user=caller.user, pid=caller.pid)
            result = await self._unless_abandoned(
                operation(args, caller, lambda step: send({"progress": step})), reader
            )
        except _Abandoned:
            log.info("control_request_abandoned", op=op, user=caller.user, pid=caller.pid)
            return
        except RequestError as exc:  # ControlError too
            send({"ok": False, "error": _error(exc.code, exc.message, exc.details)})
        except Exception:  # a bug must not leave the client without an answer
            log.exception("control_request_failed")
            send({"ok": False, "error": _error(INTERNAL, "internal error (logged)", {})})
        else:
            send({"ok": True, "result": result})
        with contextlib.suppress(OSError, ConnectionError):
            await writer.drain()

    @staticmethod
    async def _unless_abandoned(
        work: Awaitable[dict[str, Any]], reader: asyncio.StreamReader
    ) -> dict[str, Any]:
        """``work``'s result, or :class:`_Abandoned` once the client hangs up (Ctrl-C).

        Every operation can be given up at any await: a technician's request still waiting
        for the registry is withdrawn (a later answer is refused), a decommission already
        started finishes in the scheduler, a pull's collection commits whole batches.
        """
        task = asyncio.ensure_future(work)
        hang_up = asyncio.ensure_future(_end_of(reader))
        try:
            await asyncio.wait([task, hang_up], return_when=asyncio.FIRST_COMPLETED)
        finally:
            hang_up.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise _Abandoned
        return task.result()

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> tuple[str, Mapping[str, Any]]:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                line = await reader.readline()
        except TimeoutError as exc:
            msg = "no request within the time allowed"
            raise ControlError(BAD_REQUEST, msg) from exc
        except ValueError as exc:  # the line exceeded the reader's limit
            msg = f"a request is at most {MAX_REQUEST} bytes"
            raise ControlError(BAD_REQUEST, msg) from exc
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            msg = "a request is one line of JSON"
            raise ControlError(BAD_REQUEST, msg) from exc
        if (
            not isinstance(request, dict)
            or not isinstance(request.get("op"), str)
            or not isinstance(request.get("args", {}), dict)
        ):
            msg = 'a request is {"op": NAME, "args": {...}}'
            raise ControlError(BAD_REQUEST, msg)
        return request["op"], request.get("args", {})


async def _end_of(reader: asyncio.StreamReader) -> None:
    """Return when the client hangs up (whatever more it sends after its request)."""
    while await reader.read(4096):
        pass


class _Abandoned(Exception):
    """The client went away before the answer."""


def _error(code: str, message: str, details: Mapping[str, Any]) -> dict[str, Any]:
    return {"code": code, "message": message, "details": dict(details)}


async def call(
    path: Path,
    op: str,
    args: Mapping[str, Any],
    *,
    progress: Progress,
) -> dict[str, Any]:
    """Ask the daemon listening on ``path``; progress lines go to ``progress``.

    Raises :class:`ControlError`: ``unavailable`` when no daemon listens there, or the
    daemon's refusal.
    """
    try:
        reader, writer = await asyncio.open_unix_connection(os.fspath(path), limit=1 << 24)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        msg = f"the gateway daemon is not running (no control socket at {path})"
        raise ControlError(UNAVAILABLE, msg) from exc
    except PermissionError as exc:
        msg = f"no permission to use {path} (are you in the daemon's group?)"
        raise ControlError(UNAVAILABLE, msg) from exc
    try:
        writer.write(json.dumps({"op": op, "args": dict(args)}).encode() + b"\n")
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line:
                msg = "the daemon closed the connection without an answer"
                raise ControlError(UNAVAILABLE, msg)
            answer = json.loads(line)
            if "progress" in answer:
                progress(str(answer["progress"]))
                continue
            if answer.get("ok"):
                result: dict[str, Any] = answer["result"]
                return result
            error = answer.get("error") or {}
            raise ControlError(
                str(error.get("code", "error")),
                str(error.get("message", "refused")),
                error.get("details") or {},
            )
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


# ------------------------------------------------------------------------- operations


def _text(args: Mapping[str, Any], name: str, *, optional: bool = False) -> str | None:
    value = args.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        msg = f"{name} must be a text of 1 to 200 characters"
        raise ControlError(BAD_REQUEST, msg)
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for ch in value):
        msg = f"{name} must not hold control characters"
        raise ControlError(BAD_REQUEST, msg)
    return value


def _device_id(args: Mapping[str, Any]) -> bytes:
    try:
        return parse_device_id(str(args.get("device_id", "")))
    except ProtocolError as exc:
        raise ControlError(BAD_REQUEST, exc.message) from exc


def _u32(args: Mapping[str, Any], name: str) -> int:
    value = args.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 32:
        msg = f"{name} must be unix seconds"
        raise ControlError(BAD_REQUEST, msg)
    return value


def operations(handler: CommandHandler) -> dict[str, Operation]:
    """The operations the daemon offers on its control socket."""

    async def audit_pull(
        args: Mapping[str, Any], caller: Caller, progress: Progress
    ) -> dict[str, Any]:
        device_id = _device_id(args)
        reason = _text(args, "reveal_reason", optional=True)
        fmt = args.get("format", "json")
        if fmt not in audit.FORMATS:
            msg = f"format must be one of {', '.join(audit.FORMATS)}"
            raise ControlError(BAD_REQUEST, msg)
        label = _text(args, "auditor", optional=True)
        # The kernel says who asked; a name given by the caller is recorded beside it.
        auditor = f"local:{caller.user}" + (f" ({label})" if label else "")
        device = await handler.worker.run(handler.store.get_device, device_id)
        if device is None or device.decommissioned_at is not None:
            msg = f"device {format_device_id(device_id)} is not paired here"
            raise ControlError(NOT_FOUND, msg)
        try:
            collected, exported = await handler.pull(
                device,
                time_from=_u32(args, "from"),
                time_to=_u32(args, "to"),
                auditor=auditor,
                reveal_reason=reason,
                fmt=fmt,
                progress=progress,
            )
        except audit.AuditError as exc:
            raise ControlError(BAD_REQUEST, str(exc)) from exc
        except LogCollectionError as exc:
            # The device's newest records did not verify: nothing of them was stored.
            msg = f"the records on the device failed verification: {exc.error.code.name}"
            raise ControlError(LOG_VERIFICATION_FAILED, msg) from exc
        return {
            "device_id": format_device_id(device_id),
            "collected_from_device": collected,
            "export": exported.document,
            "rendered": audit.render(exported, fmt),
        }

    async def decommission(
        args: Mapping[str, Any], caller: Caller, progress: Progress
    ) -> dict[str, Any]:
        device_id = _device_id(args)
        reason = _text(args, "reason")
        assert reason is not None
        override = _text(args, "override", optional=True)
        timeout = args.get("timeout", DECOMMISSION_TIMEOUT)
        if (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not 0 < timeout <= 600
        ):
            msg = "timeout must be more than 0 and at most 600 seconds"
            raise ControlError(BAD_REQUEST, msg)
        return await handler.ask_decommission(
            device_id,
            reason=reason,
            override=override,
            requested_by=f"local:{caller.user}",
            timeout=float(timeout),
            progress=progress,
        )

    return {"audit_pull": audit_pull, "decommission": decommission}
