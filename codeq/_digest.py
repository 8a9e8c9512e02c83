"""The digest of the C++/CUDA sources the extension codeq._C is compiled from.

setup.py compiles it into the extension (``build_info()["source_digest"]``);
a source checkout that loads an installed codeq._C compares it with its own
``csrc/`` (codeq/_ext.py).  A leaf: setup.py loads this file by path, before
codeq can be imported."""

from __future__ import annotations

import hashlib
import os

__all__ = ["source_digest", "SOURCE_SUFFIXES"]

SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def source_digest(root: str) -> str | None:
    """SHA-256 (first 16 hex digits) of every source file under ``root/csrc``
    (relative path and contents, in sorted order); None when there is no csrc/."""
    csrc = os.path.join(root, "csrc")
    if not os.path.isdir(csrc):
        return None
    h = hashlib.sha256()
    files = sorted(os.path.relpath(os.path.join(d, f), csrc).replace(os.sep, "/")
                   for d, _, names in os.walk(csrc) for f in names if f.endswith(SOURCE_SUFFIXES))
    for rel in files:
        with open(os.path.join(csrc, rel), "rb") as f:
            data = f.read()
        h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()[:16]
