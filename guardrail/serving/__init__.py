"""OpenAI-compatible HTTP serving of steered generation: ``guardrail serve``.

``config`` holds the server limits, ``schemas`` the request and response models, ``errors``
the OpenAI-style error bodies, ``streaming`` the per-row decoding that feeds server-sent
events, ``batcher`` the bounded queue and the one model worker thread per loaded model,
``pool`` the loaded policies, ``admission`` the one path every request takes from its body to
its worker's queue, ``trust`` the ``Host`` allow-list and the JSON-only bodies, ``auth`` the
bearer-key check, ``metrics`` the Prometheus metrics, ``request_log`` the per-request log
event, ``lifecycle`` the drain on shutdown, and ``app`` the FastAPI application factory.
"""

from guardrail.serving.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str) -> object:
    # FastAPI is an optional extra ("serve"); import it only when the app is asked for.
    if name == "create_app":
        from guardrail.serving.app import create_app

        return create_app
    raise AttributeError(f"module 'guardrail.serving' has no attribute {name!r}")
