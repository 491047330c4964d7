"""What the people at a terminal see while a command works: spinners, progress, live tables.

On a terminal, progress is a spinner with the current step and the elapsed time, and the
scan table refreshes as adverts arrive; piped or redirected, nothing of it is shown, so a
script sees only the result on stdout and at most a one-line error on stderr.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Self

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.status import Status
from rich.table import Table

from gateway.cli import cell


def _console(stream: IO[str]) -> Console:
    return Console(file=stream, highlight=False, soft_wrap=True)


class Steps:
    """Reports the steps of one long operation (``step("collecting ...")``)."""

    def __init__(self, console: Console, status: Status | None) -> None:
        self._console = console
        self._status = status
        self._started = time.monotonic()
        self._step = ""

    def __call__(self, step: str) -> None:
        if step == self._step:
            return
        self._step = step
        if self._status is None:
            return
        elapsed = time.monotonic() - self._started
        self._status.update(f"{escape(step)} [dim]({elapsed:.0f} s)[/dim]")


@contextmanager
def steps(first: str, *, stream: IO[str] | None = None) -> Iterator[Steps]:
    """A spinner on a terminal showing the current step (nothing otherwise)."""
    console = _console(stream or sys.stderr)
    if not console.is_terminal:
        yield Steps(console, None)
        return
    with console.status(escape(first), spinner="dots") as status:
        yield Steps(console, status)


def table(rows: Sequence[Mapping[str, object]], *, title: str | None = None) -> Table:
    """Rows of equal keys as a table, the keys as headers."""
    result = Table(title=title, title_justify="left", header_style="bold")
    if not rows:
        return result
    for header in rows[0]:
        result.add_column(header, no_wrap=True)
    for row in rows:
        result.add_row(*(cell(value) for value in row.values()))
    return result


class LiveTable:
    """A table that refreshes in place on a terminal; otherwise silent until the end."""

    def __init__(self, title: str, *, enabled: bool = True, stream: IO[str] | None = None) -> None:
        self._console = _console(stream or sys.stderr)
        self._title = title
        self._enabled = enabled
        self._live: Live | None = None

    @property
    def is_live(self) -> bool:
        return self._enabled and self._console.is_terminal

    def __enter__(self) -> Self:
        if self.is_live:
            self._live = Live(
                table([], title=self._title), console=self._console, auto_refresh=False
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def show(self, rows: Sequence[Mapping[str, object]], title: str) -> None:
        if self._live is not None:
            self._live.update(table(rows, title=title), refresh=True)
