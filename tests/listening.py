"""Which processes listen on which address, read from /proc (Linux): the sockets in LISTEN state
in /proc/net/tcp and tcp6, matched to their owners through /proc/<pid>/fd."""

import ipaddress
import os
from pathlib import Path

LISTEN = "0A"


def _address(hex_ip: str) -> str:
    raw = bytes.fromhex(hex_ip)
    # The kernel prints each 32-bit word in host (little-endian) order.
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(raw)
    if address.version == 6 and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


def _socket_owners() -> dict[str, int]:
    owners = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:  # closed meanwhile
                continue
            if link.startswith("socket:["):
                owners[link[len("socket:["):-1]] = int(pid)
    return owners


def processes_with_env(marker: str) -> set[int]:
    """The processes whose environment holds `marker` (NAME=value): a process and every
    descendant that inherited its environment, even after a parent died."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.add(int(pid))
        except OSError:
            continue
    return found


def listening(pids: set[int]) -> list[tuple[str, int, int, str]]:
    """(address, port, pid, process name) of every listening TCP socket the given processes own."""
    owners = _socket_owners()
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != LISTEN:
                continue
            pid = owners.get(fields[9])
            if pid in pids:
                hex_ip, hex_port = fields[1].split(":")
                try:
                    name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                except OSError:
                    name = "?"
                found.append((_address(hex_ip), int(hex_port, 16), pid, name))
    return found
