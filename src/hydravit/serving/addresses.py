"""Which hosts count as this machine: servers warn off loopback, the load generator refuses anything else."""
from __future__ import annotations

import ipaddress

__all__ = ['is_loopback']


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ::1 (names other than localhost are not resolved)."""
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host.strip('[]')).is_loopback
    except ValueError:
        return False
