"""DKIM signing (RFC 6376) with dkimpy: plain values in, a DKIM-Signature header out.

No files, no clock of our own, no DNS: `inbound/signing.py` reads the key files and calls
these; `check-dns` compares the published key with the one derived here. Only RSA keys
(rsa-sha256) are signed with; ed25519 needs PyNaCl, which smtpfleet does not ship.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Final

import dkim
import dkim.crypto

MIN_KEY_BITS: Final = 1024  # RFC 8301 §3.2: verifiers MUST reject smaller RSA keys
_RSA_ENCRYPTION_OID: Final = bytes.fromhex("2a864886f70d010101")  # 1.2.840.113549.1.1.1
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FROM_FIELD = re.compile(rb"^from[ \t]*:", re.IGNORECASE)


class KeyProblem(ValueError):
    """A private key that cannot sign; the message never contains key material."""


@dataclass(frozen=True)
class SigningKey:
    """What one domain is signed with: the key (PEM, already checked) and how."""

    domain: str
    selector: str
    pem: bytes
    headers: tuple[str, ...] = ()  # (): dkimpy's RFC 6376 §5.4.1 choice, From oversigned
    canonicalization: str = "relaxed/relaxed"


def parse_private_key(pem: bytes) -> bytes:
    """The PEM as dkimpy reads it (LF line ends), after checking that it is a usable RSA key.

    Raises KeyProblem: not PEM, not RSA (PKCS#1 or PKCS#8), encrypted, or under 1024 bits.
    """
    normalized = pem.replace(b"\r\n", b"\n").strip() + b"\n"
    if b"ENCRYPTED" in normalized:
        raise KeyProblem("the key is encrypted (a passphrase cannot be given)")
    try:
        key = dkim.crypto.parse_pem_private_key(normalized)
    except (dkim.crypto.UnparsableKeyError, binascii.Error, ValueError, IndexError) as exc:
        problem = _first_line(exc)  # dkimpy's messages name the ASN.1 tag, not key bytes
        raise KeyProblem(f"not an RSA private key in PEM (PKCS#1 or PKCS#8): {problem}") from None
    bits = int(key["modulus"]).bit_length()
    if bits < MIN_KEY_BITS:
        raise KeyProblem(f"a {bits}-bit RSA key: at least {MIN_KEY_BITS} bits (RFC 8301)")
    return normalized


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def public_key(pem: bytes) -> str:
    """The base64 SubjectPublicKeyInfo to publish as p= (what `openssl rsa -pubout` gives)."""
    key = dkim.crypto.parse_pem_private_key(pem)
    rsa = _der(0x30, _der_int(key["modulus"]) + _der_int(key["publicExponent"]))
    algorithm = _der(0x30, _der(0x06, _RSA_ENCRYPTION_OID) + _der(0x05, b""))
    spki = _der(0x30, algorithm + _der(0x03, b"\x00" + rsa))
    return base64.b64encode(spki).decode("ascii")


def same_public_key(published: str, expected: str) -> bool:
    """Do two base64 RSA public keys (SubjectPublicKeyInfo or bare RSAPublicKey, as p= may
    carry either: RFC 6376 §3.6.1) hold the same modulus and exponent?"""
    try:
        ours = dkim.crypto.parse_public_key(base64.b64decode(expected))
        theirs = dkim.crypto.parse_public_key(base64.b64decode(published))
    except (dkim.crypto.UnparsableKeyError, binascii.Error, ValueError, IndexError):
        return "".join(published.split()) == "".join(expected.split())
    return bool(ours == theirs)


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _der_int(value: int) -> bytes:
    # A positive INTEGER whose top bit is set gets a leading zero byte (X.690 §8.3).
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def author_domain(message: bytes) -> str | None:
    """The domain of the single address in the single From: field (RFC 5322 §3.6.2), lower
    case; None when there is no From:, several, or several addresses (DMARC, RFC 7489
    §6.6.1, has no one author domain for those either)."""
    head = _HEADER_END.split(message, maxsplit=1)[0]
    fields = re.split(rb"\r?\n(?![ \t])", head)
    values = [field.split(b":", 1)[1] for field in fields if _FROM_FIELD.match(field)]
    if len(values) != 1:
        return None
    text = re.sub(r"\r?\n", "", values[0].decode("utf-8", "replace"))
    addresses = [address for _, address in getaddresses([text]) if address]
    if len(addresses) != 1 or addresses[0].count("@") != 1:
        return None
    domain = addresses[0].rsplit("@", 1)[1].strip().lower().rstrip(".")
    return domain or None


def signature(message: bytes, key: SigningKey) -> bytes:
    """The DKIM-Signature field (ending in CRLF) to put on top of `message`.

    Raises dkim.DKIMException when the message cannot be parsed (a header line that is not a
    field) or the key cannot sign.
    """
    header, body = key.canonicalization.split("/")
    headers = [name.encode("ascii") for name in key.headers] or None
    signed: bytes = dkim.sign(
        message,
        key.selector.encode("ascii"),
        key.domain.encode("ascii"),
        key.pem,
        canonicalize=(header.encode("ascii"), body.encode("ascii")),
        include_headers=headers,
    )
    return signed
