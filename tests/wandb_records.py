"""Read the records of an offline W&B run file (``run-*.wandb``).

wandb >= 0.2x writes these from its Go core and no longer ships a Python reader. The file is a
7-byte header (":W&B", magic, version) followed by LevelDB-log framed protobuf ``Record``s:
32 KiB blocks; each chunk has a 4-byte CRC, 2-byte little-endian length, 1-byte type
(1 full, 2 first, 3 middle, 4 last); a block tail shorter than a chunk header is padding.
"""

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7


def read_records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    offset, pending = HEADER, b""
    while offset + HEADER <= len(data):
        room = BLOCK - offset % BLOCK
        if room < HEADER:
            offset += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset:offset + HEADER])
        chunk = data[offset + HEADER:offset + HEADER + length]
        offset += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def summarize(path: Path) -> dict:
    """History keys, config keys (top level) and the run's name/group/job type."""
    history_keys, config, run = set(), {}, {}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history_keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
        elif kind == "config":
            config.update({item.key or "/".join(item.nested_key): item.value_json for item in record.config.update})
        elif kind == "run":
            run = {"id": record.run.run_id, "name": record.run.display_name, "group": record.run.run_group,
                   "job_type": record.run.job_type}
            config.update({item.key: item.value_json for item in record.run.config.update})
    return {"history_keys": history_keys, "config": config, "run": run}
