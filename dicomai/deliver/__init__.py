"""Delivery of result objects through the durable outbox."""
