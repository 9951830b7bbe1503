"""keyward: egress gateway for sandboxed coding agents."""

__version__ = "0.1.0"
