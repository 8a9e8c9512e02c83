"""The compiled extension records the digest of the C++ sources it was built
from; a source checkout that runs an installed build of other sources warns
once, naming both and the fix (CODEQ_REQUIRE_EXT=1: an error)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import codeq
from codeq import _ext
from codeq._digest import source_digest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree(tmp_path, text="int x;\n"):
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "csrc" / "ops.cpp").write_text(text)
    (tmp_path / "csrc" / "cpu" / "k.h").write_text("// kernel\n")
    (tmp_path / "csrc" / "notes.txt").write_text("not a source\n")
    return tmp_path


def test_digest_follows_the_sources_only(tmp_path):
    root = _tree(tmp_path)
    d = source_digest(str(root))
    assert d is not None and len(d) == 16 and d == source_digest(str(root))
    (root / "csrc" / "notes.txt").write_text("changed, but not a source\n")
    assert source_digest(str(root)) == d
    (root / "csrc" / "cpu" / "k.h").write_text("// kernel, changed\n")
    assert source_digest(str(root)) != d
    assert source_digest(str(tmp_path / "nowhere")) is None


def test_twin_mismatch_message(tmp_path):
    root = _tree(tmp_path)
    ours = source_digest(str(root))
    assert _ext.twin_mismatch(str(root), "/site/codeq/_C.so", ours) is None
    msg = _ext.twin_mismatch(str(root), "/site/codeq/_C.so", "0123456789abcdef")
    assert "/site/codeq/_C.so" in msg and "0123456789abcdef" in msg and ours in msg
    assert f"`pip install --no-build-isolation .` in {root}" in msg
    assert "no recorded digest" in _ext.twin_mismatch(str(root), "/x/_C.so", None)


def test_the_build_records_its_sources():
    info = _ext.build_info()
    if not info:
        pytest.skip("the extension is not loaded")
    if os.path.isdir(os.path.join(REPO, "csrc")) and _ext._TWIN_PATH is None \
            and os.path.dirname(os.path.dirname(codeq.__file__)) == REPO:
        assert info["source_digest"] == source_digest(REPO)  # an in-place build of this checkout
    assert isinstance(info.get("source_digest"), str) and len(info["source_digest"]) == 16


def _installed_codeq_dir():
    """The directory of an installed codeq holding a compiled _C (not this checkout)."""
    here = os.path.realpath(os.path.join(REPO, "codeq"))
    d = os.path.dirname(os.path.realpath(codeq.__file__))
    if d != here and any(f.startswith("_C") for f in os.listdir(d)):
        return d
    return None


@pytest.mark.parametrize("require", [False, True])
def test_checkout_beside_an_installed_build_of_other_sources(tmp_path, require):
    """A copy of the package (no _C) with csrc/ edited, beside the installed build: warned once / refused."""
    installed = _installed_codeq_dir()
    if installed is None:
        pytest.skip("needs codeq installed with its compiled extension (make install)")
    checkout = tmp_path / "checkout"
    shutil.copytree(os.path.join(REPO, "codeq"), checkout / "codeq",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    shutil.copytree(os.path.join(REPO, "csrc"), checkout / "csrc")
    with open(checkout / "csrc" / "ops.cpp", "a") as f:
        f.write("// an edit the installed build does not have\n")
    code = "import codeq\nfrom codeq import _ext\n_ext.available(); _ext.available()\nprint('ran')\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), os.path.dirname(installed)]),
           "CODEQ_REQUIRE_EXT": "1" if require else "0"}
    r = subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=str(checkout), env=env, capture_output=True, text=True,
                       timeout=300)
    if require:
        assert r.returncode != 0 and "other C++ sources" in r.stderr and "CODEQ_REQUIRE_EXT" in r.stderr
    else:
        assert r.returncode == 0 and "ran" in r.stdout, r.stderr
        assert r.stderr.count("other C++ sources") == 1  # once
        assert str(checkout) in r.stderr and "pip install --no-build-isolation ." in r.stderr
