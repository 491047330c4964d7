"""Every parser and verifier against random and mutated input: typed errors, nothing else.

The targets (tests/fuzz_targets.py) are shared with the coverage-guided harnesses of
fuzz/run.py. The default run keeps each target short; ``scripts/test -m fuzz`` runs the
long version: 20,000 inputs per target, about five minutes for all of them on two cores.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.harnesses import HARNESSES
from tests.fuzz_targets import TARGETS, check

QUICK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=20_000, deadline=None, suppress_health_check=list(HealthCheck))


def mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, and the seed with bytes flipped, cut, repeated or spliced."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(seed)
        for _ in range(draw(st.integers(1, 4))):
            choice = draw(st.integers(0, 3))
            position = draw(st.integers(0, max(len(data) - 1, 0)))
            if choice == 0 and data:
                data[position] ^= 1 << draw(st.integers(0, 7))
            elif choice == 1:
                data = data[:position]
            elif choice == 2:
                data[position:position] = draw(st.binary(max_size=16))
            else:
                data += data[position:]
        return bytes(data)

    return st.one_of(st.binary(max_size=600), mutate())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_parsers_refuse_bad_input_with_typed_errors(target: str) -> None:
    QUICK(given(mutations(TARGETS[target].seed))(lambda data: check(target, data)))()


@pytest.mark.fuzz
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_parsers_long_fuzz(target: str) -> None:
    LONG(given(mutations(TARGETS[target].seed))(lambda data: check(target, data)))()


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seeds_are_valid_input(target: str) -> None:
    """Mutations start from input each parser accepts, so they reach its deep paths."""
    parse, seed, _, more_seeds = TARGETS[target]
    for valid in (seed, *more_seeds):
        parse(valid)


def test_every_target_is_in_one_harness() -> None:
    """Six coverage-guided runs (fuzz/run.py, scripts/fuzz) reach every target."""
    names = [name for targets in HARNESSES.values() for name in targets]
    assert sorted(names) == sorted(TARGETS)
    assert len(HARNESSES) <= 6
