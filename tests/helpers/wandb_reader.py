"""Read the history records of an offline W&B run file (``run-*.wandb``).

wandb >= 0.2x no longer ships a Python reader for its record log, so the tests parse it here:
a 7-byte header (":W&B", magic, version), then LevelDB-log-style blocks of 32 KiB, each
record chunk = crc32 (4) + length (2, little endian) + type (1: full, 2: first, 3: middle,
4: last) + payload; payloads are ``wandb_internal_pb2.Record`` protobufs.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - (pos % BLOCK)
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            break
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def history(path: Path) -> list[dict]:
    """Every logged history row as ``{key: value}``."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    (item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows
