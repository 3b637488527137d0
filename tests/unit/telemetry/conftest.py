from tests.unit.gateway.conftest import serve

__all__ = ["serve"]
