"""Reading back what tensorboardX wrote, without TensorBoard: the TFRecord framing (8-byte
little-endian length, its masked CRC32C, the payload, the payload's masked CRC32C) around
`Event` protos, and TensorBoard's purge rule (a restarted writer's SessionLog.START at step s
hides every earlier event at step >= s)."""

import struct
from pathlib import Path

from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.record_writer import masked_crc32c


def read_event_file(path) -> list[Event]:
    """Every event in one file, checking both checksums of every record."""
    events = []
    with open(path, "rb") as f:
        while header := f.read(8):
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", f.read(4))
            payload = f.read(length)
            (payload_crc,) = struct.unpack("<I", f.read(4))
            assert header_crc == masked_crc32c(header) and payload_crc == masked_crc32c(payload), path
            events.append(Event.FromString(payload))
    return events


def event_files(directory) -> list[list[Event]]:
    """The events of each file under `directory`, files in the order they were started."""
    files = [read_event_file(p) for p in Path(directory).glob("events.out.tfevents.*")]
    return sorted((events for events in files if events), key=lambda events: events[0].wall_time)


def purge_step(events: list[Event]) -> int | None:
    """The step a writer restarted at (tensorboardX's purge_step), if it did."""
    for event in events:
        if event.HasField("session_log") and event.session_log.status == SessionLog.START:
            return event.step
    return None


def file_scalars(events: list[Event]) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of one file's scalar summaries."""
    scalars: dict[str, dict[int, float]] = {}
    for event in events:
        for value in event.summary.value:
            scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def scalars(directory) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} as TensorBoard shows the run: later files purge from their restart step."""
    merged: dict[str, dict[int, float]] = {}
    for events in event_files(directory):
        restart = purge_step(events)
        if restart is not None:
            for series in merged.values():
                for step in [s for s in series if s >= restart]:
                    del series[step]
        for tag, series in file_scalars(events).items():
            merged.setdefault(tag, {}).update(series)
    return merged
