"""storage: spool of received instances, SQLAlchemy models, durable queue and audit queries."""
