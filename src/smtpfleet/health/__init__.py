"""Relay health: SMTP probes, passive ejection, and the cluster verdict."""
