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

from guardrail.evaluation.metrics import auroc
from guardrail.plugin.manager import get_plugin_manager
from guardrail.plugin.registry import Registry
from guardrail.policy.model import load_policy
from guardrail.prompts import load_prompts, resolve_data_dir
from guardrail.training.gatefit import fit_gate_set, held_out_scores
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


def figures(scores: torch.Tensor, harmful: torch.Tensor) -> dict[str, float]:
    """AUROC and the benign share passing at the 2%-of-harmful threshold."""
    threshold = float(torch.quantile(scores[harmful], 0.02))
    return {"auroc": round(auroc(scores[harmful], scores[~harmful]) or float("nan"), 4),
            "benign_passing_at_2pct_harmful": round(
                float((scores[~harmful] < threshold).float().mean()), 3)}


def budget_reach(scores: torch.Tensor, held: torch.Tensor, harmful: torch.Tensor,
                 sources: list[str]) -> dict[str, float]:
    """What the per-side budget lets each side take: the answer side stays below every
    harmful score (shipped and cross-family), the refuse side above all but 2% of each benign
    source's; the share of benign / harmful validation prompts each side then reaches."""
    lowest = min(float(scores[harmful].min()), float(held[harmful].min()))
    highest = -float("inf")
    for source in dict.fromkeys(s for s, h in zip(sources, harmful.tolist(), strict=True)
                                if not h):
        rows = torch.tensor([s == source for s in sources])
        allowed = int(0.02 * int(rows.sum()) + 1e-9)
        for values in (scores, held):
            ordered = values[rows].sort(descending=True).values
            highest = max(highest, float(ordered[allowed]))
    return {"answer_bound": round(lowest, 4),
            "benign_answer_side": round(float((scores[~harmful] < lowest).float().mean()), 3),
            "refuse_bound": round(highest, 4),
            "harmful_refuse_side": round(float((scores[harmful] > highest).float().mean()), 3)}


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
    cache = gate_cache_root(policy.training, None)
    folds = policy.calibration.cross_family_folds if policy.calibration else None
    rows = {}
    for name, members in MEMBERS.items():
        started = time.perf_counter()
        gate = fit_gate_set(members, registry, sets.gate_train, None, 0, cache)
        scores = gate.score(v_texts, None, 0)
        held = held_out_scores(gate, registry, sets.gate_train, None, sets.val, None, 0, scores,
                               folds=folds, cache_dir=cache)
        rows[name] = {"validation": figures(scores, v_harmful),
                      "cross_family": figures(held, v_harmful),
                      "xstest": figures(gate.score(x_texts, None, 0), x_harmful),
                      "budget": budget_reach(scores, held, v_harmful,
                                             [p.source for p in sets.val]),
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
             "| gate | validation AUROC | benign passing | cross-family AUROC | benign "
             "passing | XSTest AUROC | XSTest safe passing | answer side reaches (benign) "
             "| refuse side reaches (harmful) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        v, c, x, b = row["validation"], row["cross_family"], row["xstest"], row["budget"]
        lines.append(f"| {name} | {v['auroc']} | {v['benign_passing_at_2pct_harmful']} "
                     f"| {c['auroc']} | {c['benign_passing_at_2pct_harmful']} "
                     f"| {x['auroc']} | {x['benign_passing_at_2pct_harmful']} "
                     f"| {b['benign_answer_side']} (below {b['answer_bound']}) "
                     f"| {b['harmful_refuse_side']} (above {b['refuse_bound']}) |")
    lines += ["", "Cross-family: each validation prompt scored by the gate refitted without its "
              f"family's fold ({folds or 'one per family'} folds). The last two columns: how "
              "far each side's threshold may go under the budget (no harmful validation "
              "prompt steered towards answering; at most 2% of each benign source above the "
              "refuse threshold), on the shipped and cross-family scores, and the share of "
              "validation prompts it then takes."]
    (HERE / "gate_members.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {HERE / 'gate_members.md'}")


if __name__ == "__main__":
    main()
