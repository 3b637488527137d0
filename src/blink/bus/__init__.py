"""The event bus between gateways and replicas: typed messages and transports (memory.py in one process,
redis.py over Redis Streams for many)."""
