"""sip700: a SIP proxy for the 700 middle-number (number protection) service."""

__version__ = "0.1.0"
