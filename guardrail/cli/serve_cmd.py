"""``guardrail serve``: an OpenAI-compatible HTTP server for one or more policies."""

from __future__ import annotations

import argparse
from typing import Any

import structlog

from guardrail.errors import GuardrailError

log = structlog.get_logger("guardrail.serving")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {value}; expected an integer >= 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"got {value}; expected a number > 0")
    return value


def add_parser(subparsers: Any) -> None:
    """Register ``serve``."""
    serve = subparsers.add_parser(
        "serve", help="serve policies over an OpenAI-compatible HTTP API",
        description="Serve policies at /v1/chat/completions (the request's `model` names the "
                    "policy), /v1/models, /v1/guardrail/energies and /healthz. "
                    "See docs/serving.md.",
    )
    serve.add_argument("--policy", action="append", required=True, metavar="FILE",
                       help="a policy file to serve (repeat for several)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", help="auto, cpu, cuda (overrides the policies)")
    serve.add_argument("--threads", type=_positive_int,
                       help="torch CPU threads (1 is fastest on a busy shared CPU)")
    limits = serve.add_argument_group("batching and limits")
    limits.add_argument("--max-batch-size", type=_positive_int,
                        help="requests per forward pass (default: each policy's batch_size)")
    limits.add_argument("--max-queue", type=_positive_int, default=64,
                        help="requests waiting per model before answering 503 (default 64)")
    limits.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long a first request waits for company (default 5)")
    limits.add_argument("--max-tokens-limit", type=_positive_int, default=1024,
                        help="largest max_tokens a request may ask for (default 1024)")
    limits.add_argument("--max-prompt-tokens", type=_positive_int, default=4096,
                        help="longest prompt accepted, in tokens (default 4096)")
    limits.add_argument("--max-request-bytes", type=_positive_int, default=1 << 20,
                        help="largest request body (default 1 MiB)")
    limits.add_argument("--request-timeout", type=_positive_float, default=300.0,
                        help="seconds a request may take, queue included (default 300)")
    limits.add_argument("--shutdown-timeout", type=_positive_float, default=10.0,
                        help="seconds to let running requests finish on shutdown (default 10)")
    serve.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the policies (each model once), then serve until SIGINT/SIGTERM."""
    try:
        import uvicorn

        from guardrail.serving.app import create_app
    except ModuleNotFoundError as exc:
        raise GuardrailError(
            f"`guardrail serve` needs the serve extra ({exc.name} is not installed); "
            "install it with: pip install 'guardrail[serve]'"
        ) from exc
    import torch

    from guardrail.serving.config import ServeConfig
    from guardrail.serving.pool import PolicyPool

    if not 0 <= args.port <= 65535:
        raise GuardrailError(f"--port: got {args.port}; expected 0..65535")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ServeConfig(
        max_batch_size=args.max_batch_size, max_queue=args.max_queue,
        batch_wait_ms=max(args.batch_wait_ms, 0.0), max_tokens_limit=args.max_tokens_limit,
        max_prompt_tokens=args.max_prompt_tokens, max_request_bytes=args.max_request_bytes,
        request_timeout_s=args.request_timeout,
    )
    pool = PolicyPool.load(args.policy, config, device=args.device)
    app = create_app(pool, config, shutdown_timeout_s=args.shutdown_timeout)
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=int(args.shutdown_timeout), lifespan="on",
    ))
    log.info("serve.listening", url=f"http://{args.host}:{args.port}/v1",
             policies=sorted(pool.policies), threads=torch.get_num_threads())
    server.run()
    return 0
