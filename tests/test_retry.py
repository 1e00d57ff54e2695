"""Which failed attempts may be repeated on another backend."""
from __future__ import annotations

import pytest

from apps.lb.retry import may_retry


@pytest.mark.parametrize("method, delivered, non_idempotent, replayable, expected", [
    # Nothing reached the backend: any method, as long as the body can be sent again.
    ("POST", False, False, True, True),
    ("PATCH", False, False, True, True),
    ("POST", False, False, False, False),
    # It may have reached the backend: idempotent methods only...
    ("GET", True, False, True, True),
    ("PUT", True, False, True, True),
    ("DELETE", True, False, True, True),
    ("head", True, False, True, True),
    ("POST", True, False, True, False),
    ("PATCH", True, False, True, False),
    ("FOO", True, False, True, False),
    # ...unless the operator says repeats are harmless.
    ("POST", True, True, True, True),
    ("PUT", True, False, False, False),
])
def test_may_retry(method, delivered, non_idempotent, replayable, expected):
    assert may_retry(method, delivered=delivered, non_idempotent=non_idempotent,
                     body_replayable=replayable) is expected
