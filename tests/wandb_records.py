"""Read the records of an offline wandb run file (`run-<id>.wandb`): wandb 0.31 writes them as protobuf
`Record`s in LevelDB's log framing (blocks of 32 KiB; 7-byte chunk headers: crc32, length, type). Tests use it
to check what a run told wandb (group, job type, metric definitions) without a wandb server."""

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7  # file header: ":W&B" + version


def read_records(path: str | Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    records, pending, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full | first | middle | last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def run_record(path: str | Path):
    """The run's RunRecord (name, group, job type, config)."""
    return next(r.run for r in read_records(path) if r.WhichOneof("record_type") == "run")


def metric_records(path: str | Path) -> list:
    return [r.metric for r in read_records(path) if r.WhichOneof("record_type") == "metric"]


def logged_steps(path: str | Path) -> list:
    """The `trainer/step` of every history row the run sent, in order."""
    return [
        json.loads(item.value_json)
        for record in read_records(path)
        if record.WhichOneof("record_type") == "history"
        for item in record.history.item
        if item.key == "trainer/step" or list(item.nested_key) == ["trainer/step"]
    ]
