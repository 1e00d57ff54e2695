"""The conftest's guard: only tests marked e2e may start a process."""
from __future__ import annotations

import os
import subprocess

import pytest


def test_a_test_not_marked_e2e_cannot_start_a_process():
    # Unmarked, so the guard is on while this runs: `-m "not e2e"` starts nothing.
    for start in (lambda: subprocess.run(["true"]), lambda: os.system("true")):
        with pytest.raises(pytest.fail.Exception, match="not marked e2e"):
            start()


@pytest.mark.e2e
def test_a_test_marked_e2e_can():
    assert subprocess.run(["true"]).returncode == 0
