"""Coverage-guided fuzzing of the parsers and verifiers with atheris (libFuzzer).

The targets are defined once, in tests/fuzz_targets.py, and shared with the hypothesis
tests; :mod:`fuzz.harnesses` groups them into harnesses and :mod:`fuzz.run` runs one.
"""
