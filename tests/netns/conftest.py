"""Every test here builds network namespaces: it needs root, iproute2 and CAP_NET_ADMIN.

That is the machine's capability, which no package `.ci/run` installs can bring (a container
without CAP_NET_ADMIN has none), so each test is skipped saying why, in one place. Every other
missing tool fails the suite under CI (`smtpfleet.testing.tools.unavailable`).
"""

from __future__ import annotations

import pytest

from smtpfleet.testing.netns import unavailable_reason


@pytest.fixture(autouse=True)
def _network_namespaces() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no network-fault tests on this machine: {reason}")
