"""Addresses decided by the fold from a network's CIDR (MACs: schemas.ids.mac_address).

Pure functions of their arguments, so a replay gives every NIC the same MAC and address.
"""

import ipaddress

MIN_PREFIX, MAX_PREFIX = 8, 30


def check_cidr(cidr: str) -> str | None:
    """Why ``cidr`` cannot be a network's, or None."""
    try:
        net = ipaddress.IPv4Network(cidr)
    except ipaddress.NetmaskValueError:
        return f"{cidr} has an invalid prefix length"
    except ValueError:
        try:
            ipaddress.IPv4Interface(cidr)
        except ValueError:
            return f"{cidr} is not an IPv4 network"
        host = ipaddress.IPv4Interface(cidr).network
        return f"{cidr} is not a network address (did you mean {host}?)"
    if not MIN_PREFIX <= net.prefixlen <= MAX_PREFIX:
        return f"{cidr}: the prefix must be /{MIN_PREFIX} to /{MAX_PREFIX}"
    return None


def prefix_of(cidr: str) -> int:
    return int(cidr.rsplit("/", 1)[1])


def _usable(cidr: str) -> tuple[int, int]:
    """First and last address a NIC may get: not the network, the gateway or broadcast."""
    net = ipaddress.IPv4Network(cidr)
    return int(net.network_address) + 2, int(net.broadcast_address) - 1


def check_address(cidr: str, ip: str, used: set[str]) -> str | None:
    """Why ``ip`` cannot be given to a NIC of ``cidr`` now, or None."""
    try:
        value = int(ipaddress.IPv4Address(ip))
    except ValueError:
        return f"{ip} is not an IPv4 address"
    first, last = _usable(cidr)
    if not first <= value <= last:
        if value in (first - 2, first - 1, last + 1) and ipaddress.IPv4Address(ip) in \
                ipaddress.IPv4Network(cidr):
            return f"{ip} is reserved in {cidr} (network, gateway or broadcast)"
        return f"{ip} is outside {cidr}"
    if ip in used:
        return f"{ip} is already taken in {cidr}"
    return None


def lowest_free(cidr: str, used: set[str]) -> str | None:
    """The lowest address of ``cidr`` a NIC may get that is not in ``used``."""
    first, last = _usable(cidr)
    for value in range(first, min(last, first + len(used)) + 1):
        ip = str(ipaddress.IPv4Address(value))
        if ip not in used:
            return ip
    return None
