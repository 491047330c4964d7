"""``python -m simulators``: the lockgw device simulator (see :mod:`simulators.cli`)."""

from __future__ import annotations

import sys

from simulators.cli import main

if __name__ == "__main__":
    sys.exit(main())
