"""Where users already work: LiteLLM and LangChain, pointed at ``guardrail serve``.

Both talk to the server's OpenAI-compatible API; the steering options travel in the request
body's ``guardrail`` field. Each module imports its library only inside its functions (the
``integrations`` extra), so importing this package costs nothing. docs/integrations.md has
the recipes.
"""

from __future__ import annotations

from typing import Any


def guardrail_options(*, steer: bool = True, strength: float | None = None,
                      classify: bool | None = None) -> dict[str, Any]:
    """The request body's ``guardrail`` field for these options (only what differs from the
    server's defaults)."""
    options: dict[str, Any] = {}
    if not steer:
        options["steer"] = False
    if strength is not None:
        options["strength"] = float(strength)
    if classify is not None:
        options["classify"] = classify
    return options
