"""When a failed attempt may be tried again on another backend (pure rules).

As nginx's `proxy_next_upstream`: a request that never reached a backend (no
connection could be opened) is retried whatever its method. A timeout, a
broken connection or a retryable status is retried only for idempotent
methods, unless LB_RETRY_NON_IDEMPOTENT says a repeat is harmless for all.
"""
from __future__ import annotations

# RFC 9110 section 9.2.2.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def may_retry(method: str, *, delivered: bool, non_idempotent: bool,
              body_replayable: bool) -> bool:
    """Whether a failed attempt (an error, or a retryable status) may be repeated.

    `delivered` is False when nothing reached the backend. A streamed body that
    has started flowing cannot be sent again.
    """
    if not body_replayable:
        return False
    if not delivered:
        return True
    return non_idempotent or method.upper() in IDEMPOTENT
