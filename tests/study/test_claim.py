"""Specification of the driver claim (study/claim.py): one study has one driver at a time, on a
local path and on URI storage; a driver that is gone leaves a claim that does not block a resume;
two drivers started together agree on one winner."""

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import study.claim as claim_module
from study.claim import CLAIMS, DriverClaim
from study.errors import StudyError


@pytest.fixture(autouse=True)
def quick_settle(monkeypatch):
    monkeypatch.setattr(claim_module, "SETTLE_S", 0.2)


@pytest.fixture(params=["path", "uri"])
def study_dir(request, tmp_path):
    path = tmp_path / "studies" / "s"
    return str(path) if request.param == "path" else f"file://{path}"


def local(study_dir):
    from pathlib import Path

    return Path(study_dir.removeprefix("file://"))


def plant_claim(study_dir, name, record, heartbeat_age_s=0.0):
    claims = local(study_dir) / CLAIMS
    claims.mkdir(parents=True, exist_ok=True)
    (claims / f"{name}.json").write_text(json.dumps(record))
    alive = claims / f"{name}.alive"
    alive.write_text("")
    past = time.time() - heartbeat_age_s
    os.utime(alive, (past, past))


def test_a_second_driver_is_refused_while_the_first_holds_the_study(study_dir):
    with DriverClaim(study_dir):
        with pytest.raises(StudyError) as refused:
            DriverClaim(study_dir).acquire()
        assert str(refused.value).startswith(f"study {study_dir} is being run by another driver (pid {os.getpid()} on "
                                             f"{socket.gethostname()}, since ")
        assert len(list((local(study_dir) / CLAIMS).glob("*.json"))) == 1  # the refused claim withdrew
    # Released: the next driver gets it.
    with DriverClaim(study_dir):
        pass


def test_drivers_started_together_agree_on_exactly_one_winner(study_dir):
    barrier = threading.Barrier(4)

    def attempt(_):
        barrier.wait()
        try:
            return DriverClaim(study_dir).acquire()
        except StudyError:
            return None

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(attempt, range(4)))
    winners = [claim for claim in outcomes if claim is not None]
    assert len(winners) == 1
    winners[0].release()


def test_a_claim_of_a_process_that_is_gone_does_not_block_and_is_cleared(study_dir):
    dead_pid = 2 ** 22 + 12345  # above any pid this machine hands out
    plant_claim(study_dir, "00000000000000000001-dead", {"host": socket.gethostname(), "pid": dead_pid,
                                                         "pid_start": "1", "started": "then"})
    with DriverClaim(study_dir):
        names = sorted(p.name for p in (local(study_dir) / CLAIMS).iterdir())
        assert not any(name.startswith("00000000000000000001-dead") for name in names)


def test_a_reused_pid_is_not_the_driver_that_held_the_claim(study_dir):
    # Same host, a live pid (this one), but another process start time: the old driver is gone.
    plant_claim(study_dir, "00000000000000000001-old", {"host": socket.gethostname(), "pid": os.getpid(),
                                                        "pid_start": "0", "started": "then"})
    with DriverClaim(study_dir):
        pass


@pytest.mark.parametrize("heartbeat_age_s, refused", [(1.0, True), (claim_module.STALE_S + 5, False)])
def test_a_driver_on_another_host_holds_the_study_while_its_heartbeat_is_fresh(study_dir, heartbeat_age_s, refused):
    plant_claim(study_dir, "00000000000000000001-remote", {"host": "another-host", "pid": 1, "pid_start": "1",
                                                           "started": "then"}, heartbeat_age_s)
    if refused:
        with pytest.raises(StudyError, match="being run by another driver .pid 1 on another-host"):
            DriverClaim(study_dir).acquire()
    else:
        with DriverClaim(study_dir):
            pass


def test_a_launch_that_stops_before_writing_the_study_leaves_no_study_directory(study_dir):
    with DriverClaim(study_dir):
        assert local(study_dir).is_dir()
    assert not local(study_dir).exists()


def test_a_study_with_files_keeps_its_directory_when_the_driver_leaves(study_dir):
    with DriverClaim(study_dir):
        (local(study_dir) / "study.json").write_text("{}")
    assert sorted(p.name for p in local(study_dir).iterdir()) == [CLAIMS, "study.json"]
    assert list((local(study_dir) / CLAIMS).iterdir()) == []
