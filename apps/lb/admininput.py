"""What an admin change request must bring: the bearer token, and a small, shallow JSON body."""
from __future__ import annotations

import hmac
import json
from typing import Any

from flask import Response, abort, request

from apps.lb.errors import json_error

# Admin bodies hold a URL and a weight. Larger ones get 413 before anything is
# parsed, and nesting is capped before json.loads, which a deep enough
# document would send into a RecursionError.
MAX_BODY = 64 * 1024
MAX_JSON_DEPTH = 20


def json_body() -> Any:
    """The request's JSON document, or None when it is not JSON; 413 past MAX_BODY
    (Flask's MAX_CONTENT_LENGTH), 400 past MAX_JSON_DEPTH."""
    if not request.is_json:
        return None
    raw = request.get_data()
    if nested_deeper(raw, MAX_JSON_DEPTH):
        abort(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw)
    except ValueError:
        return None


def nested_deeper(raw: bytes, limit: int) -> bool:
    """Whether a JSON text opens more than `limit` arrays or objects at once."""
    depth, in_string, escaped = 0, False, False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            if depth > limit:
                return True
        elif byte in b"]}":
            depth -= 1
    return False


def check_token(expected: str, authorization: str) -> Response | None:
    """None when `authorization` carries the right bearer token, else the error to send.

    Compared in constant time; the token is never logged or echoed.
    """
    if not expected:
        return json_error(403, "admin changes are off: set LB_ADMIN_TOKEN to enable them",
                          source="admin")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), expected.encode()):
        response = json_error(401, "missing or wrong bearer token", source="admin")
        response.headers["WWW-Authenticate"] = 'Bearer realm="lb-admin"'
        return response
    return None
