"""Wire formats and cryptography of the lockgw device protocol, sans-IO.

Bytes go in, typed events and bytes to send come out. Nothing here performs I/O or
runs an event loop, so the gateway and the device simulators run the same code in
their two roles.
"""

PROTOCOL_VERSION = 1
