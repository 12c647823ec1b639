"""OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server answers (bad JSON, unknown policy, oversize prompt, full queue,
timeout, a plugin raising) goes out in this shape, so OpenAI clients raise their usual
exception classes (``BadRequestError``, ``NotFoundError``, ...) with our message.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

STATUS_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error answered with ``status`` and an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or STATUS_TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# Union members and validator wrappers pydantic puts in an error's location ("str",
# "list[str]", "function-before[...]"), which are not field names.
_LOC_TAG = re.compile(r"^(str|int|float|bool|bytes|none|[a-z-]+\[.*\]|function-.*)$")


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _LOC_TAG.match(str(part)):
            out += f".{part}" if out else str(part)
    return out


def validation_error(exc: ValidationError) -> ApiError:
    """A 400 naming the first bad field (``messages[0].content``), its value, what was expected."""
    errors = exc.errors()
    first = errors[0]
    param = _param(tuple(first["loc"])) or None
    if first["type"] == "missing":
        message = f"{param}: required field is missing"
    elif first["type"] == "extra_forbidden":
        message = f"{param}: unknown field"
    else:
        value = first.get("input")
        shown = (f"a {type(value).__name__}" if isinstance(value, (dict, list))
                 else f"{repr(value)[:80]} ({type(value).__name__})")
        expected = first["msg"].removeprefix("Value error, ")
        expected = expected[0].lower() + expected[1:] if expected else expected
        message = f"{param}: got {shown}; {expected}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ApiError(400, message, param=param, code="invalid_value")
