"""Throwaway certificates: a private CA and a server certificate for loopback (trustme).

`smtpfleet dev` gives its nodes one so they offer STARTTLS out of the box; tests use the same
to talk TLS to nodes and relays, trusting only this CA.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import trustme

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files on disk: the CA that signed the certificate, the chain and its key."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA only."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def make_tls_files(
    directory: Path,
    names: tuple[str, ...] = LOOPBACK_NAMES,
    *,
    ca: trustme.CA | None = None,
    not_after: datetime | None = None,
) -> TlsFiles:
    """A new CA (or the given one) and a certificate for `names`, written into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = ca or trustme.CA(organization_name="smtpfleet throwaway CA")
    cert = ca.issue_cert(*names, not_after=not_after)
    files = TlsFiles(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    ca.cert_pem.write_to_path(str(files.ca_file))
    cert.private_key_pem.write_to_path(str(files.key_file))
    with files.cert_file.open("wb") as chain:
        for blob in cert.cert_chain_pems:
            chain.write(blob.bytes())
    files.key_file.chmod(0o600)
    return files


async def openssl_starttls(openssl: str, address: tuple[str, int], ca: Path, *extra: str) -> str:
    """One session by `openssl s_client` over STARTTLS (TLS 1.3, EHLO, QUIT): its report.
    `extra`: more s_client options, e.g. `-sess_out FILE` / `-sess_in FILE` to resume."""
    host, port = address
    process = await asyncio.create_subprocess_exec(
        openssl, "s_client", "-connect", f"{host}:{port}", "-starttls", "smtp", "-tls1_3",
        "-CAfile", str(ca), "-servername", "localhost", "-crlf", "-ign_eof", *extra,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(b"EHLO client.test\nQUIT\n"), 30)
    if process.returncode != 0:
        raise AssertionError(f"openssl s_client exited with {process.returncode}: {output!r}")
    return output.decode()
