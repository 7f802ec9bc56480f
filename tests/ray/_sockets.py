"""What processes listen on: (address, port) of their listening TCP sockets, and whether an
address is loopback (an IPv4-mapped IPv6 loopback, ::ffff:127.0.0.1, counts)."""

import ipaddress

import psutil


def listening(procs) -> set[tuple[str, int]]:
    found = set()
    for p in procs:
        try:
            found |= {(c.laddr.ip, c.laddr.port) for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # gone meanwhile
            pass
    return found


def loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback
