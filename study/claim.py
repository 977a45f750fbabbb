"""One study, one driver: an exclusive claim on the study's storage, on a local path or a URI.

A driver that launches or resumes a study writes a claim file into `<study>/.drivers/` (never
rewritten) and keeps a heartbeat file beside it fresh. After a short settle delay it lists the
claims and proceeds only if its own is the earliest live one, ordered by the storage's own
modification time and then by name; any other live claim means another driver holds the study,
and it withdraws with one line. Two drivers that write within the settle delay of each other see
each other and agree on the same winner; a driver that writes later sees an earlier claim.
Nothing is checked and then written: storage that offers no exclusive create (object stores)
needs none.

A claim is live while its heartbeat is fresh, or, on the driver's own host, while its process
runs (so a study whose driver was killed can be resumed at once from the same machine).
"""

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

import pyarrow.fs as pafs

from study.errors import StudyError
from study.storage import ERRORS, filesystem, join, make_dirs

CLAIMS = ".drivers"
HEARTBEAT_S = 10.0  # how often a driver refreshes its heartbeat
STALE_S = 60.0  # a heartbeat older than this is a driver that is gone
SETTLE_S = 2.0  # more than the storage's modification-time granularity (1 s on object stores)


def _process_start(pid: int) -> str | None:
    """The start time of a process on this host (clock ticks since boot), or None if none runs."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class DriverClaim:
    """The claim of one driver on one study directory (a path or a URI)."""

    def __init__(self, study_dir: str):
        self.study_dir = study_dir
        self.fs, self.path = filesystem(join(study_dir, CLAIMS))
        self.name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                       "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="study-driver-heartbeat", daemon=True)

    # --- files ----------------------------------------------------------------------------------

    def _write(self, name: str, data: bytes) -> None:
        with self.fs.open_output_stream(f"{self.path}/{name}") as f:
            f.write(data)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(*ERRORS):  # storage trouble: the study's own writes report it
                self._write(f"{self.name}.alive", b"")

    def _claims(self) -> list[tuple[float, str, dict, float | None]]:
        """Every claim: (modification time, name, record, heartbeat time or None)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        beats = {i.base_name.removesuffix(".alive"): i.mtime.timestamp() for i in infos
                 if i.base_name.endswith(".alive") and i.mtime is not None}
        claims = []
        for info in infos:
            if info.type != pafs.FileType.File or not info.base_name.endswith(".json"):
                continue
            name = info.base_name.removesuffix(".json")
            try:
                with self.fs.open_input_stream(info.path) as f:
                    record = json.loads(f.read())
            except (*ERRORS, json.JSONDecodeError):
                continue  # being written, or gone
            mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
            claims.append((mtime, name, record, beats.get(name, mtime)))
        return sorted(claims, key=lambda claim: claim[:2])

    def _live(self, record: dict, heartbeat: float | None, now: float) -> bool:
        if record.get("host") == self.record["host"]:  # the same process still runs: no waiting
            pid, start = record.get("pid"), record.get("pid_start")
            return isinstance(pid, int) and start is not None and _process_start(pid) == start
        return heartbeat is not None and now - heartbeat < STALE_S

    # --- the claim ------------------------------------------------------------------------------

    def acquire(self) -> "DriverClaim":
        """Claim the study, or StudyError naming the driver that holds it."""
        try:
            make_dirs(join(self.study_dir, CLAIMS))
            self._write(f"{self.name}.json", json.dumps(self.record).encode())
            self._write(f"{self.name}.alive", b"")
            time.sleep(SETTLE_S)
            claims = self._claims()
        except ERRORS as exc:
            raise StudyError(f"cannot claim study {self.study_dir}: {exc}") from None
        now = time.time()
        live = [claim for claim in claims if claim[1] == self.name or self._live(claim[2], claim[3], now)]
        for _, name, _, _ in claims:
            if name not in {claim[1] for claim in live}:
                self._delete(name)  # a driver that is gone
        holder = next((claim for claim in live if claim[1] != self.name), None)
        if not live or live[0][1] != self.name:
            self.release()
            record = holder[2] if holder else {}
            raise StudyError(f"study {self.study_dir} is being run by another driver (pid {record.get('pid')} on "
                             f"{record.get('host')}, since {record.get('started')}): wait for it to finish, or "
                             "stop it first; --resume continues a study only once its driver is gone")
        self._heartbeat.start()
        return self

    def release(self) -> None:
        """Withdraw the claim; a study directory that holds nothing else (the launch stopped before
        writing study.json) goes too, so no empty study is left looking started."""
        self._stop.set()
        self._delete(self.name)
        study = self.path.rsplit("/", 1)[0]
        with contextlib.suppress(*ERRORS):
            entries = self.fs.get_file_info(pafs.FileSelector(study, allow_not_found=True))
            claims_left = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
            if all(entry.base_name == CLAIMS for entry in entries) and not claims_left:
                self.fs.delete_dir(study)

    def _delete(self, name: str) -> None:
        for suffix in (".json", ".alive"):
            with contextlib.suppress(*ERRORS):
                self.fs.delete_file(f"{self.path}/{name}{suffix}")

    def __enter__(self) -> "DriverClaim":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
