"""The durable queue: the interface inbound uses, and its Redis implementation."""
