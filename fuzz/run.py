"""Run one atheris harness (or one target) under libFuzzer.

    python -m fuzz.run HARNESS [--seconds N] [--corpus DIR] [--keep-going] [-- LIBFUZZER...]
    python -m fuzz.run HARNESS --minimize CRASH [--seconds N]
    python -m fuzz.run --list

``HARNESS`` is a harness of :mod:`fuzz.harnesses` or a single target of
``tests.fuzz_targets.TARGETS``. The corpus is kept in ``DIR/corpus/HARNESS`` (seeded
with the valid inputs of the harness's targets) and crashing inputs go to
``DIR/crashes/HARNESS``; ``DIR`` is ``build/fuzz`` unless given. A crash is any
exception the target's :func:`~tests.fuzz_targets.check` does not accept as a typed
refusal.

By default the first crash ends the run, as libFuzzer does. With ``--keep-going`` each
crash is written (input and traceback, once per distinct exception type and place) and
the run goes on, so that a timed run lasts its whole time and finds more than one bug.
Run from the repository's root, so that ``tests`` is importable.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import atheris

from fuzz.harnesses import HARNESSES, pick

DEFAULT_ROOT: Final = Path("build/fuzz")
INSTRUMENTED: Final = ("protocols", "gateway")
"""The packages whose code is instrumented for coverage: the code under test."""


def harness_targets(name: str) -> tuple[str, ...]:
    """The targets of harness ``name``, or ``(name,)`` for a single target."""
    if name in HARNESSES:
        return HARNESSES[name]
    if any(name in targets for targets in HARNESSES.values()):
        return (name,)
    msg = f"no harness or target {name!r} (see --list)"
    raise SystemExit(msg)


def load_targets(also: Sequence[str] = ()) -> Callable[[str, bytes], None]:
    """Import the targets with the code under test (and ``also``) instrumented; return
    ``check``."""
    with atheris.instrument_imports(include=[*INSTRUMENTED, *also]):
        from tests import fuzz_targets  # noqa: PLC0415 - imported under instrumentation

    missing = {name for targets in HARNESSES.values() for name in targets} ^ set(
        fuzz_targets.TARGETS
    )
    if missing:
        msg = f"harnesses and targets disagree on {sorted(missing)}"
        raise SystemExit(msg)
    return fuzz_targets.check


def seed_corpus(corpus: Path, targets: Sequence[str]) -> int:
    """Write each target's valid inputs, behind its dispatch byte; return how many."""
    from tests.fuzz_targets import TARGETS  # noqa: PLC0415 - after instrumentation

    corpus.mkdir(parents=True, exist_ok=True)
    count = 0
    for index, name in enumerate(targets):
        target = TARGETS[name]
        for number, seed in enumerate((target.seed, *target.more_seeds)):
            (corpus / f"seed-{name}-{number}").write_bytes(bytes([index]) + seed)
            count += 1
    return count


def target_entries(
    targets: Sequence[str], check: Callable[[str, bytes], None]
) -> dict[str, Callable[[bytes], None]]:
    """One instrumented entry function per target, so that libFuzzer tells them apart.

    libFuzzer keeps an input only if it adds coverage. Targets that share their code
    (a command and signed claims both run the whole verifier) would look alike, and the
    inputs of one would be dropped as redundant and never mutated. Each entry is its own
    instrumented code, so every target's inputs add coverage of their own. The paths the
    targets share still count once: a corpus grown before a target joined its harness
    can starve it, so fuzz such a target alone for a while (``python -m fuzz.run TARGET``).
    """
    entries: dict[str, Callable[[bytes], None]] = {}
    for name in targets:

        def enter(data: bytes, name: str = name) -> None:
            check(name, data)

        entries[name] = atheris.instrument_func(enter)
    return entries


class Harness:
    """libFuzzer's ``TestOneInput``: dispatch on the first byte, check the target."""

    def __init__(
        self,
        targets: tuple[str, ...],
        check: Callable[[str, bytes], None],
        crashes: Path,
        *,
        keep_going: bool,
    ) -> None:
        self.targets = targets
        self.entries = target_entries(targets, check)
        self.crashes = crashes
        self.keep_going = keep_going
        self.seen: set[tuple[str, str, str, int]] = set()

    def __call__(self, data: bytes) -> None:
        picked = pick(self.targets, data)
        if picked is None:
            return
        name, target_input = picked
        try:
            self.entries[name](target_input)
        except Exception as exc:
            if not self.keep_going:
                raise
            self.record(name, data, exc)

    def record(self, name: str, data: bytes, exc: Exception) -> None:
        """Write a crash once per (target, exception type, innermost place)."""
        frames = traceback.extract_tb(exc.__traceback__)
        place = frames[-1] if frames else None
        key = (
            name,
            type(exc).__qualname__,
            place.filename if place else "",
            (place.lineno or 0) if place else 0,
        )
        if key in self.seen:
            return
        self.seen.add(key)
        digest = hashlib.sha1(data, usedforsecurity=False).hexdigest()
        path = self.crashes / f"crash-{digest}"
        path.write_bytes(data)
        report = "".join(traceback.format_exception(exc))
        path.with_suffix(".txt").write_text(f"target: {name}\n{report}", encoding="utf-8")
        sys.stderr.write(f"\n==== crash in {name}, written to {path}\n{report}\n")


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fuzz.run", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("harness", nargs="?", help="a harness (see --list) or a single target")
    parser.add_argument("--list", action="store_true", help="list harnesses and their targets")
    parser.add_argument("--seconds", type=int, default=600, help="libFuzzer's -max_total_time")
    parser.add_argument(
        "--corpus",
        type=Path,
        default=DEFAULT_ROOT,
        metavar="DIR",
        help="root of the corpus and crash directories (default: %(default)s)",
    )
    parser.add_argument("--keep-going", action="store_true", help="record crashes, go on")
    parser.add_argument("--max-len", type=int, default=4096, help="largest input, bytes")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    parser.add_argument("--rss-limit-mb", type=int, default=2048, help="memory limit")
    parser.add_argument(
        "--instrument",
        action="append",
        default=[],
        metavar="PACKAGE",
        help="instrument this package too (e.g. construct: slower, finer guidance)",
    )
    parser.add_argument(
        "--minimize",
        type=Path,
        metavar="CRASH",
        help="shrink this crashing input (libFuzzer's -minimize_crash) instead of fuzzing",
    )
    parser.epilog = "Options after -- go to libFuzzer as they are (e.g. -- -seed=1)."
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    arguments = parser.parse_args(argv[:cut])
    arguments.libfuzzer = argv[cut + 1 :]
    if not arguments.list and not arguments.harness:
        parser.error("name a harness, or --list")
    return arguments


def main(argv: Sequence[str] | None = None) -> None:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    if arguments.list:
        for name, targets in HARNESSES.items():
            sys.stdout.write(f"{name}: {' '.join(targets)}\n")
        return
    targets = harness_targets(arguments.harness)
    check = load_targets(arguments.instrument)
    root: Path = arguments.corpus
    corpus = root / "corpus" / arguments.harness
    crashes = root / "crashes" / arguments.harness
    crashes.mkdir(parents=True, exist_ok=True)
    seeds = seed_corpus(corpus, targets)
    sys.stderr.write(
        f"harness {arguments.harness}: targets {', '.join(targets)}; {seeds} seeds; "
        f"corpus {corpus}; crashes {crashes}\n"
    )
    common = [
        # Seeds stay in the corpus even where another target's input covers the same
        # code (every command seed runs the verifier as the signed claims do); dropped,
        # they would never be mutated.
        "-keep_seed=1",
        f"-rss_limit_mb={arguments.rss_limit_mb}",
        f"-timeout={arguments.timeout}",
        f"-artifact_prefix={crashes}/",
        *arguments.libfuzzer,
    ]
    if arguments.minimize is not None:
        # Writes minimized-from-* files into the crash directory; the smallest is the last.
        libfuzzer = [
            sys.argv[0],
            "-minimize_crash=1",
            f"-max_total_time={arguments.seconds}",
            *common,
            str(arguments.minimize),
        ]
        atheris.Setup(libfuzzer, Harness(targets, check, crashes, keep_going=False))
        atheris.Fuzz()
        return
    libfuzzer = [
        sys.argv[0],
        f"-max_total_time={arguments.seconds}",
        f"-max_len={arguments.max_len}",
        "-print_final_stats=1",
        *common,
        str(corpus),
    ]
    harness = Harness(targets, check, crashes, keep_going=arguments.keep_going)
    atheris.Setup(libfuzzer, harness)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
