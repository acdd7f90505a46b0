"""Wire types of tidewire, declared once: `client` for PROTOCOL.md frames, `bus` for NATS messages."""
