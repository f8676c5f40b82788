"""Read the records of an offline W&B run file (``run-*.wandb``).

wandb >= 0.2x writes these from its Go core and no longer ships a Python reader. The file is a
7-byte header (":W&B", magic, version) followed by LevelDB-log framed protobuf ``Record``s:
32 KiB blocks; each chunk has a 4-byte CRC, 2-byte little-endian length, 1-byte type
(1 full, 2 first, 3 middle, 4 last); a block tail shorter than a chunk header is padding.
"""

import json
import struct
import time
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


def wait_for_exit(path: Path, timeout: float = 60.0) -> bool:
    """Wait until the run file holds its "exit" record (the last one written). In-process,
    run.finish() can return before wandb-core has flushed the file; after the training process
    has exited this returns at once. False when it did not appear within the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in read_records(path)):
                return True
        except Exception:  # a record still being written
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _metric(record) -> dict:
    m = record.metric
    ops = [op for op in ("min", "max", "mean", "best", "last", "none", "copy", "first")
           if getattr(m.summary, op)]
    return {"step_metric": m.step_metric, "summary": set(ops), "glob": bool(m.glob_name),
            "hidden": m.options.hidden}


def _tables(row: dict) -> dict:
    """{key: {"path": ..., ...}} for the tables in one history/summary record, whose items are
    nested keys ("results/per_domain/_type", ".../path", ...)."""
    found = {}
    for key, value in row.items():
        if key.endswith("/_type") and value in ("table-file", "partitioned-table"):
            base = key[:-len("/_type")]
            found[base] = {k[len(base) + 1:]: v for k, v in row.items() if k.startswith(base + "/")}
    return found


def summarize(path: Path, timeout: float = 60.0) -> dict:
    """What an offline run file holds, as plain data:

    history_keys  every key logged to history (nested keys joined with "/")
    history       {key: [value, ...]} (JSON-decoded; tables and images are their file refs)
    config        top-level config keys -> JSON text
    run           id, name, group, job_type, tags (list), sweep_id
    metrics       {name or glob: {"step_metric", "summary" (set of ops), "glob", "hidden"}}
    summary       {key: value} from summary records (the last value written wins; nested
                  keys joined with "/"; with a define_metric summary, a dict {"max": .., "last": ..})
    tables        {key: table file ref {"_type": "table-file", "path": ..., ...}}
    files         [path of each saved run file, relative to the run's files folder]
    artifacts     [{"type", "name", "metadata" (dict), "aliases", "files" [paths]}]
    """
    wait_for_exit(path, timeout)
    history_keys, config, run = set(), {}, {}
    history, metrics, summary, files, artifacts, tables = {}, {}, {}, [], [], {}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {}
            for item in record.history.item:
                key = _key(item)
                history_keys.add(key)
                value = _json(item.value_json)
                history.setdefault(key, []).append(value)
                row[key] = value
            tables.update(_tables(row))
        elif kind == "config":
            config.update({_key(item): item.value_json for item in record.config.update})
        elif kind == "run":
            run = {"id": record.run.run_id, "name": record.run.display_name, "group": record.run.run_group,
                   "job_type": record.run.job_type, "tags": list(record.run.tags),
                   "sweep_id": record.run.sweep_id}
            config.update({item.key: item.value_json for item in record.run.config.update})
        elif kind == "metric":
            name = record.metric.name or record.metric.glob_name
            metrics[name] = {**metrics.get(name, {}), **_metric(record)}
        elif kind == "summary":
            row = {_key(item): _json(item.value_json) for item in record.summary.update}
            summary.update(row)
            for key, ref in _tables(row).items():
                tables.setdefault(key, ref)
        elif kind == "files":
            files.extend(f.path for f in record.files.files)
        elif kind == "artifact":
            a = record.artifact
            artifacts.append({"type": a.type, "name": a.name, "metadata": _json(a.metadata or "{}"),
                              "aliases": list(a.aliases),
                              "files": [entry.path for entry in a.manifest.contents]})
    return {"history_keys": history_keys, "history": history, "config": config, "run": run,
            "metrics": metrics, "summary": summary, "tables": tables, "files": files,
            "artifacts": artifacts}


def read_table(run_file: Path, ref: dict) -> dict:
    """A logged wandb.Table's JSON ({"columns": [...], "data": [[...], ...]}), from the run's
    files folder beside the run file."""
    return json.loads((Path(run_file).parent / "files" / ref["path"]).read_text())
