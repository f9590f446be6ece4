"""The messages load is made of: each carries a unique tag in its Message-ID.

The tag is how a sink's deliveries are matched with what the cluster accepted (`reconcile`).
"""

from __future__ import annotations

RECIPIENT = "sink@example.net"
SENDER = "load@example.com"
TAG_DOMAIN = "loadgen.smtpfleet"


def message_bytes(tag: str, size: int) -> bytes:
    head = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: load {tag}\r\n"
        f"Message-ID: <{tag}@{TAG_DOMAIN}>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body + b".\r\n"


def tag_of(data: bytes) -> str | None:
    """The load tag in a received message's Message-ID, or None for foreign mail."""
    head = data.split(b"\r\n\r\n", 1)[0]
    marker = f"@{TAG_DOMAIN}>".encode()
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"message-id:") and marker in line:
            return line.split(b"<", 1)[1].split(b"@", 1)[0].decode()
    return None
