"""Gate members compared: how well each harm gate separates benign from harmful prompts.

Fits each gate on the shipped Qwen policy's gate training prompts (training sources, gate-only
sources included) and scores the policy's validation prompts and XSTest (safe vs unsafe,
never trained on): AUROC, and the share of benign prompts passing where 2% of harmful ones
do (what a low-false-pass gate threshold lets through). Writes bench/gate_members.md and
.json. Fitted gates come from (and go to) the gate cache `guardrail train` fills, so after a
train run the fine-tuned gate costs nothing here.

    python bench/gate_members.py                 # frozen MiniLM, fine-tuned MiniLM, their sum
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from guardrail.gating import GateSet
from guardrail.plugins import Registry, get_plugin_manager
from guardrail.policy import load_policy
from guardrail.prompts import load_prompts, resolve_data_dir
from guardrail.training.gatefit import fit_gate_set
from guardrail.training.metrics import auroc
from guardrail.training.pipeline import gate_cache_root
from guardrail.training.sources import load_prompt_sets

HERE = Path(__file__).resolve().parent
POLICY = HERE.parent / "policies" / "eds-qwen2.5-coder-0.5b.yaml"
MEMBERS: dict[str, list[tuple[str, dict[str, Any], float]]] = {
    "sentence-embedding (frozen MiniLM + logistic regression)": [
        ("sentence-embedding", {}, 1.0)],
    "fine-tuned-encoder (shipped)": [("fine-tuned-encoder", {"epochs": 2}, 1.0)],
    "fine-tuned-encoder + sentence-embedding, summed": [
        ("fine-tuned-encoder", {"epochs": 2}, 1.0), ("sentence-embedding", {}, 1.0)],
}


def figures(gate: GateSet, texts: list[str], harmful: torch.Tensor) -> dict[str, float]:
    """AUROC and the benign share passing at the 2%-of-harmful threshold."""
    scores = gate.score(texts, None, 0)
    threshold = float(torch.quantile(scores[harmful], 0.02))
    return {"auroc": round(auroc(scores[harmful], scores[~harmful]) or float("nan"), 4),
            "benign_passing_at_2pct_harmful": round(
                float((scores[~harmful] < threshold).float().mean()), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=str(POLICY))
    args = parser.parse_args()
    policy = load_policy(args.policy)
    assert policy.training is not None
    sets = load_prompt_sets(policy.training)
    registry = Registry.from_plugin_manager(get_plugin_manager())
    xstest = load_prompts(resolve_data_dir(None) / "xstest_v2_prompts.csv", field="prompt")
    x_texts = [r.text for r in xstest]
    x_harmful = torch.tensor([str(r.fields.get("type", "")).startswith("contrast")
                              for r in xstest])
    v_texts = [p.text for p in sets.val]
    v_harmful = torch.tensor([p.context == "harmful" for p in sets.val])
    rows = {}
    for name, members in MEMBERS.items():
        started = time.perf_counter()
        gate = fit_gate_set(members, registry, sets.gate_train, None, 0,
                            gate_cache_root(policy.training, None))
        rows[name] = {"validation": figures(gate, v_texts, v_harmful),
                      "xstest": figures(gate, x_texts, x_harmful),
                      "seconds": round(time.perf_counter() - started, 1)}
        print(name, rows[name], flush=True)
    out = {"policy": policy.name, "fitted_on": len(sets.gate_train),
           "validation_prompts": len(v_texts), "xstest_prompts": len(x_texts),
           "machine": platform.platform(), "rows": rows}
    (HERE / "gate_members.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# Gate members compared", "",
             f"`python bench/gate_members.py`: each gate fitted on the {out['fitted_on']} gate "
             f"training prompts of `{policy.name}` (gate-only sources included), scored on its "
             f"{out['validation_prompts']} validation prompts and on XSTest's "
             f"{out['xstest_prompts']} (safe vs unsafe; never trained on). \"Passing\": the "
             "share of benign prompts scoring below the threshold that lets 2% of the harmful "
             "ones through.", "",
             "| gate | validation AUROC | validation benign passing | XSTest AUROC "
             "| XSTest safe passing |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        v, x = row["validation"], row["xstest"]
        lines.append(f"| {name} | {v['auroc']} | {v['benign_passing_at_2pct_harmful']} "
                     f"| {x['auroc']} | {x['benign_passing_at_2pct_harmful']} |")
    (HERE / "gate_members.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {HERE / 'gate_members.md'}")


if __name__ == "__main__":
    main()
