"""The synchronous engine: add_request / abort / step(). No I/O, no asyncio."""
