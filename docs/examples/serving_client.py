"""Call a running `guardrail serve` with the official `openai` Python client.

Start a server first (see docs/serving.md), e.g.

    guardrail serve --policy policies/eds-smollm2-135m.yaml --port 8000 --threads 1

then run

    python docs/examples/serving_client.py --model eds-smollm2-135m

It lists the served policies, asks one question steered and unsteered (printing the
guardrail telemetry of each), streams an answer token by token, and scores a prompt's
energies without generating.
"""

from __future__ import annotations

import argparse
import json
import os

import httpx
import openai


def main() -> None:
    """Run the tour against ``--base-url``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", help="a served policy name (default: the first one)")
    parser.add_argument("--prompt", default="How do I kill a Python process that hangs?")
    args = parser.parse_args()

    # A server started with --api-key / GUARDRAIL_API_KEY needs the key; without one it takes
    # any (the client insists on sending one).
    key = os.environ.get("GUARDRAIL_API_KEY") or "not-needed"
    client = openai.OpenAI(base_url=args.base_url, api_key=key)
    served = [model.id for model in client.models.list()]
    print("served policies:", ", ".join(served))
    model = args.model or served[0]
    messages = [{"role": "user", "content": args.prompt}]

    for steer in (False, True):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=48, temperature=0,  # type: ignore[arg-type]
            extra_body={"guardrail": {"steer": steer}},
        )
        completion = raw.parse()
        telemetry = (completion.model_extra or {})["guardrail"]
        print(f"\n--- {'steered' if steer else 'unsteered'} "
              f"({raw.headers['x-guardrail-total-ms']} ms, batch of "
              f"{raw.headers['x-guardrail-batch-size']}) ---")
        print(completion.choices[0].message.content)
        for layer in telemetry["energies"]:
            print(f"  L{layer['layer']}: energy {layer['energy_before']:+.2f} -> "
                  f"{layer['energy_after']:+.2f}")
        if telemetry["verdict"] is not None:
            print("  refuses" if telemetry["verdict"]["refused"] else "  complies")

    print("\n--- streamed ---")
    stream = client.chat.completions.create(model=model, messages=messages,  # type: ignore[arg-type]
                                            max_tokens=48, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        extra = chunk.model_extra or {}
        if "guardrail" in extra:
            print(f"\n  layers steered: {extra['guardrail']['layers_steered']}")

    # The check-only endpoint is not part of the OpenAI API: plain HTTP.
    energies = httpx.post(f"{args.base_url}/guardrail/energies",
                          json={"model": model, "messages": messages},
                          headers={"authorization": f"Bearer {key}"}, timeout=60).json()
    print("\n--- energies without generating ---")
    print(json.dumps(energies["energies"], indent=2))


if __name__ == "__main__":
    main()
