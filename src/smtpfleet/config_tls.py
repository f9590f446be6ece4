"""Why a certificate and key pair cannot be loaded, in words that name the file at fault.

`ssl.SSLContext.load_cert_chain` says `[SSL] PEM lib (_ssl.c:3905)` for an empty file, a
swapped pair or a key where the certificate belongs, and `[Errno 21] Is a directory` without
saying which file. This looks at the files themselves (only which PEM blocks they hold: their
content is never repeated) and says which one is wrong and how, as the Redis and relay CA
checks of `config check` already do (`cannot use X with Y: ...`).
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Final

_BEGIN_RE: Final = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,40})-----")
_MAX_PEM_BYTES: Final = 1 << 20  # a chain is a few kB; enough to see which blocks it has
_REASONS: Final = {
    "KEY_VALUES_MISMATCH": "the private key does not belong to the certificate",
    "NO_START_LINE": "no PEM block where one was expected",
}


ENCRYPTED_KEY: Final = "the private key is encrypted: a node cannot ask for its passphrase"


def no_passphrase() -> bytes:
    """`load_cert_chain`'s password callback. Without one, OpenSSL asks for an encrypted
    key's passphrase on the terminal: a node (or `config check`) started from one waited
    there, its event loop blocked, every session with it; without a terminal it printed the
    prompt into the log. With it, such a key is one clear error."""
    raise ValueError(ENCRYPTED_KEY)


def describe_pair_failure(cert_file: str, key_file: str, exc: BaseException) -> str:
    """`cannot use CERT with KEY: what is wrong`, for `exc` from load_cert_chain(CERT, KEY)."""
    why = _certificate_problem(cert_file) or _key_problem(key_file) or _reason(exc)
    return f"cannot use {cert_file} with {key_file}: {why}"


def _certificate_problem(path: str) -> str | None:
    blocks, problem = _pem_blocks(path)
    if problem or any(b.endswith("CERTIFICATE") for b in blocks):
        return problem
    if any(b.endswith("PRIVATE KEY") for b in blocks):
        return f"{path} holds a private key, not a certificate (cert_file and key_file swapped?)"
    return f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"


def _key_problem(path: str) -> str | None:
    blocks, problem = _pem_blocks(path)
    if problem:
        return problem
    if "ENCRYPTED PRIVATE KEY" in blocks or "Proc-Type: 4,ENCRYPTED" in blocks:
        return f"{path} holds an encrypted private key: a node cannot ask for its passphrase"
    if any(b.endswith("PRIVATE KEY") for b in blocks):
        return None
    if any(b.endswith("CERTIFICATE") for b in blocks):
        return f"{path} holds a certificate, not a private key (cert_file and key_file swapped?)"
    return f"{path} holds no PEM private key (-----BEGIN PRIVATE KEY-----)"


def _pem_blocks(path: str) -> tuple[set[str], str | None]:
    """The PEM block labels in the file (and a legacy encryption header), or why it cannot
    be read."""
    try:
        with Path(path).open("rb") as file:
            data = file.read(_MAX_PEM_BYTES)
    except OSError as exc:
        return set(), f"{path}: {exc.strerror or exc}"
    if not data.strip():
        return set(), f"{path} is empty"
    blocks = {label.decode() for label in _BEGIN_RE.findall(data)}
    if b"Proc-Type: 4,ENCRYPTED" in data:  # PKCS#1 encrypted with a passphrase
        blocks.add("Proc-Type: 4,ENCRYPTED")
    return blocks, None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return _REASONS.get(exc.reason, exc.reason.lower().replace("_", " "))
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
