"""sipguard: an inline SIP proxy that enforces an Acceptable Use Policy on every call."""

__version__ = "0.1.0"
