"""`smtpfleet auth hash USER`: a line for `inbound.auth.users_file`.

The password comes from stdin, never from the command line (where `ps` and shell history
would keep it): typed twice without echo on a terminal, or the first line of a pipe.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from smtpfleet.errors import ConfigError
from smtpfleet.inbound.auth import hash_password

EXIT_OK = 0


def run(args: argparse.Namespace) -> int:
    user = args.user
    if not user or ":" in user or user != user.strip() or user.startswith("#"):
        raise ConfigError(f"{user!r}: a user name has no ':', no outer blanks, no leading '#'")
    print(f"{user}:{hash_password(_password())}")
    return EXIT_OK


def _password() -> str:
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise ConfigError("the passwords differ")
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        raise ConfigError("empty password")
    try:
        password.encode("utf-8")  # as AUTH reads it: bytes that are not UTF-8 never match
    except UnicodeEncodeError:
        raise ConfigError("the password is not UTF-8 text") from None
    return password
