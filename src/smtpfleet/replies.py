"""Every SMTP reply smtpfleet itself emits, named once (RFC 5321 codes, RFC 3463 enhanced codes).

Keeping them here means a reply's wording and class are reviewed in one place, and tests can
assert on the same constants the server sends.
"""

from __future__ import annotations

from typing import Final

# RFC 5321 §3.8 / §4.2.3: "service not available, closing transmission channel", whoever says
# it: a relay closing our session, or we closing a client's. The one name for the code.
CLOSING_CODE: Final = 421

QUEUED_FMT: Final = "250 2.0.0 Ok: queued as {qid}"
OK: Final = "250 2.0.0 Ok"
SENDER_OK: Final = "250 2.1.0 Sender ok"
RCPT_OK: Final = "250 2.1.5 Recipient ok"
# A recipient already in the transaction (domain in any case, RFC 5321 §2.4): accepted, as
# Postfix does, and kept once, so the relay gets one RCPT and the mailbox one copy.
RCPT_DUPLICATE: Final = "250 2.1.5 Recipient ok (duplicate, delivered once)"

# Our own failures before the durable write are always temporary (DESIGN invariant 1).
QUEUE_UNAVAILABLE: Final = "451 4.3.0 Queue temporarily unavailable, try again later"
QUEUE_FULL: Final = "452 4.3.1 Queue full, try again later"
# The node-wide budget of message bytes being received is spent (RFC 5321 §4.2.5: 452).
NO_ROOM: Final = "452 4.3.1 Insufficient system storage, try again later"
SHUTTING_DOWN: Final = "421 4.3.2 Service shutting down, try again later"
TOO_MANY_SESSIONS: Final = "421 4.3.2 Too many connections, try again later"
TIMEOUT: Final = "421 4.4.2 Idle timeout, closing connection"
LOCAL_ERROR: Final = "451 4.3.0 Local error in processing, try again later"
# dkim.on_failure: tempfail (docs/security.md): the client keeps the message and retries.
NOT_SIGNED: Final = "451 4.3.0 Message could not be DKIM-signed, try again later"

RELAY_DENIED: Final = "550 5.7.1 Relaying denied"
BAD_ADDRESS: Final = "553 5.1.3 Bad recipient address syntax"
BAD_SENDER: Final = "553 5.1.7 Bad sender address syntax"
# RCPT TO:<Postmaster> (RFC 5321 §4.1.1.3) on a node with no accepted domain to complete it
# with: the syntax is right, there is no mailbox (X.1.2: no destination system).
POSTMASTER_NO_DOMAIN: Final = (
    "550 5.1.2 No local domain for <Postmaster> here; name one: <postmaster@domain>"
)
# The same MAIL or RCPT parameter twice (`SIZE=26214401 SIZE=10`): RFC 5321 §4.2.3's 501,
# syntax error in parameters, rather than one of the values silently.
REPEATED_PARAMETER: Final = "501 5.5.4 Parameter {keyword} given more than once"
TOO_MANY_RECIPIENTS: Final = "452 4.5.3 Too many recipients"
MESSAGE_TOO_BIG: Final = "552 5.3.4 Message size exceeds fixed maximum message size"
HEADERS_TOO_BIG: Final = "552 5.3.4 Message header section too large"
LINE_TOO_LONG: Final = "500 5.5.2 Line too long (RFC 5321 section 4.5.3.1.6)"
# RFC 5321 section 2.3.8: lines end with CRLF only. A bare CR or LF in DATA is how SMTP
# smuggling hides a second message; we refuse the whole message rather than guess.
BARE_LINE_ENDING: Final = "550 5.6.11 Bare CR or LF in message data; lines must end with CRLF"
LOOP_DETECTED: Final = "554 5.4.6 Too many Received headers: mail loop detected"
BAD_HELO: Final = "501 5.5.4 Syntax: {command} hostname"
NO_RECIPIENTS: Final = "503 5.5.1 Need RCPT command"

# aiosmtpd's own protocol replies, given enhanced codes (RFC 3463) by inbound/server.py.
LOCAL_ERROR_CLOSING: Final = "421 4.3.0 Local error in processing, closing connection"
COMMAND_TOO_LONG: Final = "500 5.5.2 Command line too long (RFC 5321 section 4.5.3.1.4)"
SYNTAX_ERROR: Final = "500 5.5.2 Syntax error"
NON_ASCII_COMMAND: Final = "500 5.5.2 Non-ASCII command; SMTPUTF8 is not offered"
UNKNOWN_COMMAND: Final = "500 5.5.1 Command not recognized"
# RFC 5321 section 3.8: a server that gives up on a client says 421 before it closes.
TOO_MANY_UNKNOWN: Final = "421 4.7.0 Too many unrecognized commands, closing connection"
TOO_MANY_JUNK: Final = "421 4.7.0 Too many commands without mail, closing connection"
NEED_MAIL: Final = "503 5.5.1 Need MAIL command"
NESTED_MAIL: Final = "503 5.5.1 Nested MAIL command"
BYE: Final = "221 2.0.0 Bye"

# STARTTLS (RFC 3207) and AUTH (RFC 4954); RFC 3207 §4: 530 until the client starts TLS.
TLS_READY: Final = "220 2.0.0 Ready to start TLS"
MUST_STARTTLS: Final = "530 5.7.0 Must issue a STARTTLS command first"
TLS_NOT_OFFERED: Final = "502 5.5.1 STARTTLS not offered"
TLS_ACTIVE: Final = "503 5.5.1 TLS already active"
AUTH_REQUIRED: Final = "530 5.7.0 Authentication required"
# RFC 4954 §6: a mechanism that would send the password in clear is refused with 538.
ENCRYPTION_REQUIRED: Final = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_NOT_OFFERED: Final = "502 5.5.1 AUTH not offered on this port"
AUTH_OK: Final = "235 2.7.0 Authentication successful"
AUTH_INVALID: Final = "535 5.7.8 Authentication credentials invalid"
AUTH_ALREADY: Final = "503 5.5.1 Already authenticated"
AUTH_SYNTAX: Final = "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
AUTH_BAD_BASE64: Final = "501 5.5.2 Can't decode base64"
AUTH_LINE_TOO_LONG: Final = "500 5.5.6 Authentication Exchange line is too long"  # RFC 4954 §6
AUTH_CANNOT_SPLIT: Final = "501 5.5.2 Can't split auth value"
# RFC 4616 §2: a PLAIN authorization identity other than the user's own asks to act as
# someone else, which nobody here may.
AUTH_OTHER_IDENTITY: Final = "535 5.7.8 Authorization identity must be empty or the user's own"
# Per client IP; the client may come back later (RFC 3463 X.7.0, as Postfix's anvil does).
AUTH_TOO_MANY_FAILURES: Final = "421 4.7.0 Too many failed authentication attempts, closing"

# Per-client limits, counted across the cluster (inbound/limits.py). X.7.0/X.7.1: a policy
# refusal the client may retry later; 421 closes the connection (RFC 5321 §3.8).
CLIENT_TOO_MANY_SESSIONS: Final = (
    "421 4.7.0 Too many concurrent connections from your address, try again later"
)
CLIENT_TOO_MANY_MESSAGES: Final = (
    "451 4.7.1 Too many messages from your address in the last minute, try again later"
)
CLIENT_TOO_MANY_RECIPIENTS: Final = (
    "451 4.7.1 Too many recipients from your address in the last minute, try again later"
)
# RFC 5321 §4.5.3.2.5 times DATA per block; a client trickling far below any real link's speed
# is holding a session (and its share of the node) open, and is cut.
DATA_TOO_SLOW: Final = "421 4.4.2 Message data arriving too slowly, closing connection"
