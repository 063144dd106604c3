"""Read a W&B offline run (``wandb/offline-run-*/run-<id>.wandb``) without uploading it.

An offline run keeps everything it logged in one ``.wandb`` file: a LevelDB-style log of
protobuf ``Record`` messages (``wandb.proto.wandb_internal_pb2``). wandb no longer ships a Python
reader for it, so this module is one (about fifty lines): it yields the records, and
:func:`read_run` folds them into the run's id, name, group, tags, config, history, summary,
exit code and image files, as ``wandb sync`` would upload them.

    from wandb_offline import read_run
    run = read_run("outputs/multirun/<sweep>/<job>/wandb/offline-run-...")
    run["summary"]["test/bpd"], run["history"][-1], run["images"]
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["iter_records", "read_run", "find_runs"]

_BLOCK = 32768
_HEADER = 7  # file header "<4sHB" (":W&B", 0xBEE1, version) and each record's "<IHB" (crc, length, type)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[bytes]:
    ident, magic, _version = struct.unpack("<4sHB", data[:_HEADER])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError("not a W&B run file (bad header)")
    pos, pending = _HEADER, None
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:  # too little room for a record header: the block is padded
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        body = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        if kind == _FULL:
            yield body
        elif kind == _FIRST:
            pending = body
        elif kind == _MIDDLE and pending is not None:
            pending += body
        elif kind == _LAST and pending is not None:
            yield pending + body
            pending = None


def iter_records(path: str | Path):
    """The ``Record`` messages of one ``.wandb`` file, in the order they were written."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in _chunks(Path(path).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(raw)
        yield rec


def _set_nested(d: dict, item, value) -> None:
    keys = [item.key] if item.key else list(item.nested_key)
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """One offline run folder (``offline-run-<time>-<id>``) or its ``.wandb`` file, as a dict:
    ``id, name, group, tags, config, history (list of dicts), summary, exit_code (None while
    unfinished), finished, images (paths under files/media/images)``."""
    run_dir = Path(run_dir)
    files = [run_dir] if run_dir.is_file() else sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    out: dict[str, Any] = {"id": None, "name": None, "group": None, "tags": [], "config": {}, "history": [],
                           "summary": {}, "exit_code": None, "finished": False}
    for rec in iter_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(id=r.run_id, name=r.display_name, group=r.run_group, tags=list(r.tags))
            for item in r.config.update:
                _set_nested(out["config"], item, json.loads(item.value_json))
        elif kind == "config":
            for item in rec.config.update:
                _set_nested(out["config"], item, json.loads(item.value_json))
        elif kind == "history":
            row: dict = {}
            for item in rec.history.item:
                _set_nested(row, item, json.loads(item.value_json))
            out["history"].append(row)
        elif kind == "summary":  # a logged dict (an image, a table) arrives as one update per nested key
            for item in rec.summary.update:
                _set_nested(out["summary"], item, json.loads(item.value_json))
            for item in rec.summary.remove:
                keys = [item.key] if item.key else list(item.nested_key)
                d = out["summary"]
                for k in keys[:-1]:
                    d = d.get(k, {})
                d.pop(keys[-1], None)
        elif kind == "exit":
            out["exit_code"] = int(rec.exit.exit_code)
        elif kind == "final":
            out["finished"] = True
    if out["exit_code"] is not None:
        out["finished"] = True
    folder = files[0].parent
    out["images"] = sorted(str(p) for p in (folder / "files" / "media" / "images").rglob("*") if p.is_file())
    out["path"] = str(folder)
    return out


def find_runs(root: str | Path) -> list[Path]:
    """Every offline run folder under ``root`` (a sweep, a job, or a ``wandb`` folder)."""
    return sorted(p.parent for p in Path(root).rglob("offline-run-*/run-*.wandb"))
