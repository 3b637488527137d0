"""The ASGI gateway: OpenAI-compatible HTTP + SSE and the WebSocket realtime protocol.

It never imports torch or the engine: it reaches replicas only through the bus.
"""
