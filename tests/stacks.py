"""Where a process that hangs stands: the Python stacks of it and of every process under it (a
local Ray's raylet, its workers and trial actors), read with py-spy (which `ray[default]`
installs), for the message of a test that timed out. Linux only (/proc)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path


def _parents() -> dict[int, int]:
    parents = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        parents[int(pid)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, parents before children."""
    parents = _parents()
    tree = [pid]
    for member in tree:
        tree += sorted(child for child, parent in parents.items() if parent == member)
    return tree


def python_stacks(pid: int, timeout: float = 20) -> str:
    """py-spy's dump of each Python process in the tree of `pid` (its command line first)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    parts = []
    for member in process_tree(pid):
        try:
            command = Path(f"/proc/{member}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "python" not in command and not command.startswith("ray::"):
            continue  # Ray's own binaries (gcs_server, raylet) have no Python stack
        try:
            dump = subprocess.run([spy, "dump", "--pid", str(member)], capture_output=True, text=True,
                                  timeout=timeout)
            text = dump.stdout or dump.stderr
        except (OSError, subprocess.TimeoutExpired) as exc:
            text = f"(no dump: {exc})"
        parts.append(f"--- pid {member}: {command[:160]}\n{text.strip()}")
    return "\n".join(parts)
