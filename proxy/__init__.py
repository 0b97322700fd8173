"""sip700: a SIP proxy for the 700 middle-number (number protection) service."""

__version__ = "0.1.0"

# before any compiled module loads: a stale build is not used (proxy/compiled.py)
from proxy import compiled as _compiled

_compiled.guard()
