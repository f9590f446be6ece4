"""smtpfleet: an active-active SMTP proxy cluster with a durable Redis-streams queue."""

__version__ = "0.1.0"
