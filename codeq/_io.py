"""Files written safely.  Atomic writes: a temporary file beside the target,
fsynced, then ``os.replace``d onto the target, so that a crash or kill
mid-write leaves the previous file intact (checkpoints, reports, exports).
JSON without NaN or Inf (metrics, reports)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets

__all__ = ["temp_path", "atomic_path", "atomic_file", "atomic_write_bytes", "write_json", "json_safe", "read_jsonl"]


def temp_path(path: str) -> str:
    """A fresh hidden name next to ``path`` (same directory, so os.replace is atomic)."""
    d, base = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(d, f".{base}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path for the caller to write; on success it is fsynced
    and renamed onto ``path``, on any error it is removed."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path, mode: str = "wb"):
    """``with atomic_file(p) as f: f.write(...)`` -- the file appears at ``p`` only complete."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def write_json(path, obj) -> None:
    """``obj`` as indented JSON (NaN/Inf as null), written atomically."""
    atomic_write_bytes(path, (json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n").encode())


def json_safe(v):
    """``v`` with every NaN or Inf float (in nested dicts and lists) replaced by None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def read_jsonl(path) -> list[dict]:
    """The JSON objects of a JSON-lines file (metrics.jsonl); a line that is not
    one (a write cut short by a kill) is skipped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out
