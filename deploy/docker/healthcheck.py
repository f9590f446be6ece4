"""The image's HEALTHCHECK: GET /healthz on the node's own HTTP port; exit 0 when it says 200.

The port comes from the node's configuration (the file in $SMTPFLEET_CONFIG plus the
SMTPFLEET_* overrides), so moving `http.listen` does not break the check. A wildcard
address is checked on loopback; `unix:/PATH` over the socket. No HTTP listener: healthy
(there is nothing to ask).
"""

from __future__ import annotations

import os
import socket
import sys

TIMEOUT_S = 3.0


def main() -> int:
    from smtpfleet.config import load_config  # noqa: PLC0415 - keeps `--help`-free startup

    try:
        config = load_config(os.environ.get("SMTPFLEET_CONFIG"))
    except Exception as exc:  # noqa: BLE001 - any config error means "unhealthy", said once
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    listen = config.http.listen
    if not listen:
        return 0
    try:
        if config.http.unix_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(TIMEOUT_S)
            sock.connect(config.http.unix_path)
        else:
            from smtpfleet.config import parse_hostport  # noqa: PLC0415

            host, port = parse_hostport(listen)
            if host in ("0.0.0.0", "::", "*"):  # noqa: S104 - a wildcard bind, checked on loopback
                host = "127.0.0.1" if host != "::" else "::1"
            sock = socket.create_connection((host, port), timeout=TIMEOUT_S)
        with sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            response = b""
            while chunk := sock.recv(4096):
                response += chunk
    except OSError as exc:
        print(f"healthcheck: {listen}: {exc}", file=sys.stderr)
        return 1
    status = response.split(b" ", 2)[1:2]
    if status == [b"200"]:
        return 0
    print(f"healthcheck: {listen}: {response[:100]!r}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
