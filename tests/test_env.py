"""The CODEQ_* switches are read one way (codeq._env.env_flag)."""

import pytest

from codeq._env import env_flag


@pytest.mark.parametrize("value, want", [(None, "default"), ("", "default"), (" ", "default"), ("0", False),
                                         ("false", False), ("False", False), ("NO", False), ("off", False),
                                         ("1", True), ("true", True), ("yes", True), ("on", True)])
def test_env_flag(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv("CODEQ_X", raising=False)
    else:
        monkeypatch.setenv("CODEQ_X", value)
    for default in (False, True):
        assert env_flag("CODEQ_X", default) == (default if want == "default" else want)
