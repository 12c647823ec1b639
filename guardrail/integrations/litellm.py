"""LiteLLM in front of ``guardrail serve``: the server as one more OpenAI-compatible backend.

``model_entry`` writes the ``model_list`` item a LiteLLM proxy config (or ``litellm.Router``)
takes: LiteLLM's ``openai/`` provider with the server as ``api_base`` and the steering
options in ``extra_body``. docs/examples/litellm_config.yaml is a complete proxy config.
"""

from __future__ import annotations

from typing import Any

from guardrail.integrations import guardrail_options


def model_entry(name: str, base_url: str, policy: str, *, api_key_env: str | None = None,
                steer: bool = True, strength: float | None = None,
                classify: bool | None = None) -> dict[str, Any]:
    """A LiteLLM ``model_list`` entry: requests for ``name`` go to ``policy`` on the server
    at ``base_url`` (``.../v1``) with these steering options. ``api_key_env`` names the
    variable holding the server's key (LiteLLM reads ``os.environ/NAME``)."""
    params: dict[str, Any] = {
        "model": f"openai/{policy}",
        "api_base": base_url,
        "api_key": f"os.environ/{api_key_env}" if api_key_env else "not-needed",
    }
    options = guardrail_options(steer=steer, strength=strength, classify=classify)
    if options:
        params["extra_body"] = {"guardrail": options}
    return {"model_name": name, "litellm_params": params}
