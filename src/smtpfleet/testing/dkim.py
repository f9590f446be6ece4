"""Throwaway DKIM keys and a resolver for dkimpy's verify, for tests and `smtpfleet dev`.

cryptography comes with trustme (the `testing` extra); the node itself signs with dkimpy.
"""

from __future__ import annotations

from base64 import b64encode
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

KEY_BITS = 2048  # RFC 8301 §3.2: signers SHOULD use at least 2048 bits


@dataclass(frozen=True)
class DkimKeyFile:
    """A private key on disk and the p= value that publishes it."""

    key_file: Path
    public_key: str  # base64 SubjectPublicKeyInfo

    def txt_record(self) -> str:
        """The TXT record of selector._domainkey.domain (RFC 6376 §3.6.1)."""
        return f"v=DKIM1; k=rsa; p={self.public_key}"


def make_dkim_key(path: Path, bits: int = KEY_BITS) -> DkimKeyFile:
    """A new RSA key written to `path` (PKCS#8 PEM, mode 0600, as a mounted secret is)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pem)
    path.chmod(0o600)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return DkimKeyFile(path, b64encode(der).decode("ascii"))


def txt_lookup(records: Mapping[str, str]) -> Callable[..., bytes | None]:
    """A `dnsfunc` for dkim.verify: {"s1._domainkey.example.com": "v=DKIM1; ..."}, no DNS."""

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        text = records.get(name.decode("ascii").rstrip(".").lower())
        return text.encode("ascii") if text is not None else None

    return lookup
