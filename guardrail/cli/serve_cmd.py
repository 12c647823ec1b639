"""``guardrail serve``: an OpenAI-compatible HTTP server for one or more policies."""

from __future__ import annotations

import argparse
import os

import structlog

from guardrail.cli.arg_types import device, non_negative_float, port, positive_float, positive_int
from guardrail.errors import GuardrailError
from guardrail.serving.auth import ENV_VAR
from guardrail.serving.trust import default_hosts

log = structlog.get_logger("guardrail.serving")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``serve``."""
    serve = subparsers.add_parser(
        "serve", help="serve policies over an OpenAI-compatible HTTP API",
        description="Serve policies at /v1/chat/completions (the request's `model` names the "
                    "policy), /v1/models, /v1/guardrail/energies, /healthz, /readyz and "
                    "/metrics. See docs/serving.md.",
    )
    serve.add_argument("--policy", action="append", required=True, metavar="POLICY",
                       help="a policy file or shipped policy name to serve (repeat for several)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=port, default=8000)
    serve.add_argument("--device", type=device, help="auto, cpu, cuda (overrides the policies)")
    serve.add_argument("--threads", type=positive_int,
                       help="torch CPU threads (1 is fastest on a busy shared CPU)")
    limits = serve.add_argument_group("batching and limits")
    limits.add_argument("--max-batch-size", type=positive_int,
                        help="requests per forward pass (default: each policy's batch_size)")
    limits.add_argument("--max-queue", type=positive_int, default=64,
                        help="requests waiting per model before answering 503 (default 64)")
    limits.add_argument("--batch-wait-ms", type=non_negative_float, default=5.0,
                        help="how long a first request waits for company (default 5)")
    limits.add_argument("--max-tokens-limit", type=positive_int, default=1024,
                        help="largest max_tokens a request may ask for (default 1024)")
    limits.add_argument("--max-prompt-tokens", type=positive_int, default=4096,
                        help="longest prompt accepted, in tokens (default 4096)")
    limits.add_argument("--max-request-bytes", type=positive_int, default=1 << 20,
                        help="largest request body (default 1 MiB)")
    limits.add_argument("--request-timeout", type=positive_float, default=300.0,
                        help="seconds a request may take, queue included (default 300)")
    limits.add_argument("--drain-timeout", "--shutdown-timeout", dest="drain_timeout",
                        type=positive_float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM/SIGINT, seconds running requests may take to finish; "
                             "queued ones get 503 at once (default 30)")
    access = serve.add_argument_group("access")
    access.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="a Host name clients may use besides the bound address and "
                             "localhost (repeat for several; '*' allows any, as behind a proxy "
                             "that checks it). Other names get 400: a browser page cannot "
                             "reach the server by DNS rebinding")
    access.add_argument("--api-key", metavar="KEY",
                        help=f"require `Authorization: Bearer KEY` on every path but /healthz "
                             f"and /readyz (default: ${ENV_VAR}; prefer the variable, a "
                             "command line is visible to other users)")
    replicated = serve.add_argument_group("replicas on Ray Serve (docs/scaling.md)")
    replicated.add_argument("--replicas", type=positive_int, metavar="N",
                            help="serve the same app as N Ray Serve replicas, each with its own "
                            "model copy (default: one process, no Ray)")
    replicated.add_argument("--ray-address", metavar="ADDR",
                            help="Ray cluster to deploy on (default: start Ray on this machine)")
    replicated.add_argument("--ray-cpus-per-replica", type=positive_float, default=1.0,
                            metavar="C", help="CPUs each replica reserves (default 1)")
    replicated.add_argument("--ray-gpus-per-replica", type=non_negative_float, default=0.0,
                            metavar="G", help="GPUs each replica reserves (default 0)")
    serve.set_defaults(func=run)


def api_key_from(args: argparse.Namespace) -> str | None:
    """``--api-key``, else ``GUARDRAIL_API_KEY``; an empty key is an error, not "no auth"."""
    key = args.api_key if args.api_key is not None else os.environ.get(ENV_VAR)
    if key is not None and not key.strip():
        where = "--api-key" if args.api_key is not None else ENV_VAR
        raise GuardrailError(f"{where}: the API key is empty; give a key, or unset it to serve "
                             "without authentication")
    return key


def run(args: argparse.Namespace) -> int:
    """Load the policies (each model once), then serve until SIGINT/SIGTERM."""
    try:
        import prometheus_client  # noqa: F401 - the serve extra, checked before loading models
        import uvicorn  # noqa: F401

        from guardrail.serving.app import create_app
        from guardrail.serving.lifecycle import run_server
    except ModuleNotFoundError as exc:
        raise GuardrailError(
            f"`guardrail serve` needs the serve extra ({exc.name} is not installed); "
            "install it with: pip install 'guardrail-eds[serve]'"
        ) from exc
    import torch

    from guardrail.serving.config import ServeConfig
    from guardrail.serving.pool import PolicyPool

    api_key = api_key_from(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    allowed = default_hosts(args.host, args.allowed_host)
    config = ServeConfig(
        max_batch_size=args.max_batch_size, max_queue=args.max_queue,
        batch_wait_ms=max(args.batch_wait_ms, 0.0), max_tokens_limit=args.max_tokens_limit,
        max_prompt_tokens=args.max_prompt_tokens, max_request_bytes=args.max_request_bytes,
        request_timeout_s=args.request_timeout, drain_timeout_s=args.drain_timeout,
        allowed_hosts=allowed,
    )
    if args.replicas:
        from guardrail.serving.ray_serve import build_application, run_replicated

        application = build_application(
            args.policy, config, replicas=args.replicas, device=args.device, api_key=api_key,
            cpus_per_replica=args.ray_cpus_per_replica, gpus_per_replica=args.ray_gpus_per_replica,
            threads=args.threads)
        run_replicated(application, host=args.host, port=args.port, address=args.ray_address)
        return 0
    pool = PolicyPool.load(args.policy, config, device=args.device)
    app = create_app(pool, config, api_key=api_key)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serve.no_auth", host=args.host,
                    hint=f"anyone who can reach {args.host} can use the model; set {ENV_VAR}")
    if "*" in allowed and api_key is None:
        log.warning("serve.any_host", hint="--allowed-host '*' without an API key: a web page "
                    "in a browser on a machine that can reach the server can use it (DNS "
                    "rebinding); set an API key")
    log.info("serve.listening", url=f"http://{args.host}:{args.port}/v1",
             policies=sorted(pool.policies), threads=torch.get_num_threads(),
             auth=api_key is not None, drain_timeout_s=args.drain_timeout,
             allowed_hosts=sorted(allowed))
    run_server(app, host=args.host, port=args.port)
    return 0
