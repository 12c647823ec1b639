"""A LangChain chat model that answers through ``guardrail serve``.

``chat_model`` is langchain-openai's ``ChatOpenAI`` pointed at the server, with the policy as
its model and the steering options in every request's body; everything LangChain does with
a chat model (chains, tools-free agents, streaming, batching) works as with any other.
"""

from __future__ import annotations

from typing import Any

from guardrail.integrations import guardrail_options


def chat_model(base_url: str, policy: str, *, api_key: str | None = None, steer: bool = True,
               strength: float | None = None, classify: bool | None = None,
               **kwargs: Any) -> Any:
    """``ChatOpenAI`` for ``policy`` on the server at ``base_url`` (``.../v1``).

    ``strength`` multiplies the calibrated step size for every request (the server refuses
    more than the artifact's calibration allows); ``steer=False`` asks for the unsteered
    model; ``api_key`` is the server's key (``GUARDRAIL_API_KEY``), if it has one. Other
    keyword arguments go to ``ChatOpenAI`` (``temperature``, ``max_tokens``, ...).
    """
    try:
        from langchain_openai import ChatOpenAI
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "the LangChain integration needs langchain-openai: pip install "
            "'guardrail-eds[integrations]'") from exc
    options = guardrail_options(steer=steer, strength=strength, classify=classify)
    extra_body = {**kwargs.pop("extra_body", {}), **({"guardrail": options} if options else {})}
    return ChatOpenAI(base_url=base_url, model=policy, api_key=api_key or "not-needed",
                      extra_body=extra_body or None, **kwargs)
