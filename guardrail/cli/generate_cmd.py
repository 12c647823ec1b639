"""``guardrail generate`` (optionally base vs steered side by side) and ``guardrail chat``."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import TYPE_CHECKING, Any

from guardrail.cli.arg_types import device, positive_float, positive_int, probability, seed
from guardrail.console import printable
from guardrail.steering.generation import user_turns

if TYPE_CHECKING:  # guardrail.steering.guard imports torch: only the commands themselves load it
    from guardrail.steering.guard import GenerationResult, Guardrail
    from guardrail.telemetry import GenerationTelemetry


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``generate`` and ``chat``."""
    gen = subparsers.add_parser("generate", help="answer prompts with a policy")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--policy", required=True, help="a policy file or a shipped policy's name")
    mode = gen.add_mutually_exclusive_group()
    mode.add_argument("--compare", action="store_true", help="base and steered side by side")
    mode.add_argument("--no-steer", action="store_true", help="the unsteered model only")
    _generation_args(gen)
    gen.add_argument("--json", action="store_true", help="print JSON instead of text")
    gen.set_defaults(func=run_generate)

    chat = subparsers.add_parser("chat", help="multi-turn chat with a policy (type /help)")
    chat.add_argument("--policy", required=True, help="a policy file or a shipped policy's name")
    _generation_args(chat)
    chat.set_defaults(func=run_chat)


def _generation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=positive_int)
    parser.add_argument("--do-sample", action="store_true", default=None)
    parser.add_argument("--temperature", type=positive_float)
    parser.add_argument("--top-p", type=probability)
    parser.add_argument("--seed", type=seed)
    parser.add_argument("--device", type=device, help="auto, cpu, cuda (overrides the policy)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.do_sample,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }


def energy_line(telemetry: GenerationTelemetry, disabled: dict[int, str] | None = None) -> str:
    """``L3 +2.31->-0.87`` per steered layer, at the last prompt token; says why a layer shows
    no energy (its gate kept the row out, the energy was not finite, or the layer was disabled
    at load)."""
    if not telemetry.layers and not disabled:
        return "(no energy model)"
    gated_out = {g.rail for g in telemetry.gates if not g.steered}
    parts = []
    for item in telemetry.layers:
        skipped = (f"skipped at {item.nonfinite_positions} position"
                   f"{'s' if item.nonfinite_positions > 1 else ''} (non-finite energy)"
                   if item.nonfinite_positions else "")
        if item.energy_before is None:
            if skipped:
                parts.append(f"L{item.layer} {skipped}")
            continue
        after = f"{item.energy_after:+.2f}" if item.energy_after is not None else "?"
        parts.append(f"L{item.layer} {item.energy_before:+.2f}->{after}"
                     + (f" {skipped}" if skipped else ""))
    for layer, why in sorted((disabled or {}).items()):
        parts.append(f"L{layer} disabled ({why})")
    if not parts and gated_out:
        return f"(not steered: the gate of rail {', '.join(sorted(gated_out))} kept it out)"
    return "  ".join(parts) if parts else "(no energy at the last prompt token)"


def gate_lines(telemetry: GenerationTelemetry) -> list[str]:
    """Per gated rail: the harm score and the side the gate chose, against its thresholds."""
    lines = []
    for gate in telemetry.gates:
        below = "never" if gate.below is None else f"{gate.below:+.2f}"
        above = "never" if gate.above is None else f"{gate.above:+.2f}"
        if gate.side == "answer":
            what = f"steered towards answering (score below {below})"
        elif gate.side == "refuse":
            what = f"steered towards refusing (score above {above})"
        else:
            what = f"left as the model has it (answer below {below}, refuse above {above})"
        lines.append(f"rail {gate.rail}: harm score {gate.score:+.2f}, {what}")
    return lines


def disabled_layers(guard: Guardrail) -> dict[int, str]:
    """Layers of the guardrail's rails that were disabled at load, and why."""
    return {layer: why for rail in guard.rails for layer, why in rail.disabled.items()}


def _verdict(guard: Guardrail, prompt: str, result: GenerationResult) -> str:
    verdict = guard.classify([prompt], [result.text])[0]
    return "REFUSES" if verdict.refused else "complies"


def run_generate(args: argparse.Namespace) -> int:
    """Answer each prompt; ``--compare`` prints base and steered answers and the energies."""
    from guardrail.steering.guard import Guardrail

    guard = Guardrail.from_policy(args.policy, device=args.device)
    conversations = user_turns(args.prompts)
    overrides = _overrides(args)
    steered = None if args.no_steer else guard.generate(conversations, steer=True, **overrides)
    base = (
        guard.generate(conversations, steer=False, **overrides)
        if (args.compare or args.no_steer)
        else None
    )
    if args.json:
        rows = []
        for i, prompt in enumerate(args.prompts):
            row: dict[str, Any] = {"prompt": prompt}
            for label, results in (("base", base), ("steered", steered)):
                if results is not None:
                    row[label] = {
                        "text": results[i].text,
                        "finish_reason": results[i].finish_reason,
                        "refused": guard.classify([prompt], [results[i].text])[0].refused,
                        "telemetry": results[i].telemetry.to_dict(),
                    }
            rows.append(row)
        print(json.dumps(rows, indent=2))
        return 0
    width = 100
    for i, prompt in enumerate(args.prompts):
        print("=" * width)
        print(f"PROMPT   {printable(prompt, newlines=False)}")
        for label, results in (("BASE", base), ("STEERED", steered)):
            if results is None:
                continue
            result = results[i]
            print(f"{label:<8} [{_verdict(guard, prompt, result)}]")
            body = printable(result.text.strip()) or "(empty)"
            print(
                textwrap.indent(textwrap.fill(body, width - 9, replace_whitespace=False), " " * 9)
            )
        if steered is not None:
            print(f"ENERGY   {energy_line(steered[i].telemetry, disabled_layers(guard))}")
            for line in gate_lines(steered[i].telemetry):
                print(f"GATE     {line}")
    return 0


def run_chat(args: argparse.Namespace) -> int:
    """A multi-turn REPL; ``/base`` toggles steering, ``/reset`` clears, ``/quit`` leaves."""
    from guardrail.steering.guard import Guardrail

    guard = Guardrail.from_policy(args.policy, device=args.device)
    history: list[dict[str, str]] = []
    steer = True
    print(
        printable(f"policy {guard.policy.name!r} on {guard.loaded.name}; /help for commands",
                  newlines=False), file=sys.stderr
    )
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/help":
            print("/base toggles steering, /reset clears the conversation, /quit leaves")
            continue
        if line == "/reset":
            history.clear()
            continue
        if line == "/base":
            steer = not steer
            print(f"steering {'on' if steer else 'off'}")
            continue
        history.append({"role": "user", "content": line})
        result = guard.generate([history], steer=steer, **_overrides(args))[0]
        history.append({"role": "assistant", "content": result.text})
        print(f"bot> {printable(result.text.strip())}")
        if steer:
            print(f"     energy {energy_line(result.telemetry, disabled_layers(guard))}")
