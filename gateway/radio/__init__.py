"""Radio layer: Bluetooth LE central, moving opaque ATT fragments.

Import the backend you need from its module (``gateway.radio.bumble``); this package only
re-exports the backend-neutral boundary.
"""

from gateway.radio.base import (
    Link,
    Radio,
    RadioConnectError,
    RadioDisconnectedError,
    RadioError,
    RadioTimeoutError,
    ScanResult,
    max_fragment_size,
)

__all__ = [
    "Link",
    "Radio",
    "RadioConnectError",
    "RadioDisconnectedError",
    "RadioError",
    "RadioTimeoutError",
    "ScanResult",
    "max_fragment_size",
]
