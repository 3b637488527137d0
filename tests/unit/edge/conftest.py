"""The live gateway fixture of the gateway's tests: here it plays the core an edge links to."""

from tests.unit.gateway.conftest import serve

__all__ = ["serve"]
