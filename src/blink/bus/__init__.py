"""The event bus between gateways and replicas: typed messages and transports (memory; Redis Streams next)."""
