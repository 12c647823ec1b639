"""Evaluation reports: a JSON file with everything, a Markdown summary, a console table;
and the files of a sweep (JSON, Markdown table, trade-off plot)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from guardrail.evaluation.kl import KLResult
from guardrail.evaluation.metrics import Rate
from guardrail.evaluation.runner import Contender, SuiteResult
from guardrail.evaluation.sweep import SweepPoint, sweep_table

FORMAT = "guardrail-eval/1"


def build_report(
    results: Sequence[SuiteResult],
    contenders: Sequence[Contender],
    *,
    settings: dict[str, Any],
    command: str | None = None,
    kl: dict[str, KLResult] | None = None,
) -> dict[str, Any]:
    """The JSON report: settings, contenders, per-suite scores and the KL capability guard."""
    return {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "settings": settings,
        "contenders": [
            {"label": c.label, "policy": c.policy, "steered": c.steer, "model": c.guard.loaded.name,
             "path": str(c.guard.policy.path) if c.guard.policy.path else None,
             "rails": [r.model_dump(mode="json") for r in c.guard.policy.rails if r.enabled]
             if c.steer else []}
            for c in contenders
        ],
        "suites": [r.to_dict() for r in results],
        "kl": {label: value.to_dict() for label, value in (kl or {}).items()} or None,
    }


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md_path = out / "report.md"
    md_path.write_text(markdown(report), encoding="utf-8")
    return json_path, md_path


def write_generations(results: Sequence[SuiteResult], out_dir: str | Path) -> list[Path]:
    """One JSONL file per suite and contender with every prompt/answer pair and its verdict."""
    paths = []
    for result in results:
        for row in result.rows:
            folder = Path(out_dir) / "generations" / _slug(result.suite.name)
            path = folder / f"{_slug(row.label)}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8") as handle:
                for record in row.records:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            paths.append(path)
    return paths


def write_sweep(points: Sequence[SweepPoint], out_dir: str | Path, *, title: str = ""
                ) -> dict[str, Path]:
    """Write ``sweep.json``, ``sweep.md`` and ``sweep.png`` into ``out_dir``."""
    from guardrail.evaluation.plots import plot_tradeoff

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "sweep.json", "table": out / "sweep.md", "plot": out / "sweep.png"}
    paths["json"].write_text(json.dumps([p.to_dict() for p in points], indent=2) + "\n")
    paths["table"].write_text(sweep_table(points))
    plot_tradeoff(points, paths["plot"], title=title)
    return paths



def _rate(data: dict[str, Any]) -> Rate:
    return Rate(**{k: data[k] for k in ("k", "n", "rate", "low", "high")})


def _cell(data: dict[str, Any], base: dict[str, Any] | None = None) -> str:
    rate = _rate(data)
    if rate.rate is None:
        return "–"
    text = f"**{rate.rate:.2f}** [{rate.low:.2f}, {rate.high:.2f}] {rate.k}/{rate.n}"
    if base is not None and base["rate"] is not None and base is not data:
        text += f" ({rate.rate - base['rate']:+.2f})"
    return text


def suite_sections(report: dict[str, Any]) -> list[str]:
    """Markdown lines: a heading, the item counts and the comparison table per suite."""
    lines: list[str] = []
    for suite in report["suites"]:
        lines += [f"## {suite['name']}", "",
                  f"{suite['items']} of {suite['total']} items ({suite['benign']} benign, "
                  f"{suite['harmful']} harmful).", ""]
        lines += suite_table(suite) + [""]
    return lines


def suite_table(suite: dict[str, Any]) -> list[str]:
    """Markdown table of one suite: every contender side by side, differences against the base."""
    rows = suite["rows"]
    base = next((r for r in rows if not r["steered"]), None)
    head = next((r["timing"]["head_tokens"] for r in rows if r.get("timing")), 16)
    lines = [
        "| policy | benign compliance ↑ | clean compliance ↑ | harmful refusal ↑ "
        f"| flips vs base: right / wrong | refuses after token {head} / recovers "
        "| empty | degenerate | cut off |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        q = row["quality"]
        lines.append(
            f"| {row['label']} | {_cell(row['compliance'], base and base['compliance'])} "
            f"| {_cell(row['clean_compliance'], base and base['clean_compliance'])} "
            f"| {_cell(row['refusal'], base and base['refusal'])} "
            f"| {flips_cell(row)} | {timing_cell(row)} "
            f"| {q['empty']} | {q['degenerate']} | {q['cut_off']} |"
        )
    budgets = [r for r in rows if r.get("budget")]
    gates = [r for r in rows if r.get("gate")]
    if budgets or gates:
        lines += [""] + [f"- {budget_line(r)}" for r in budgets] + [
            f"- {gate_line(r)}" for r in gates]
    return lines


def flips_cell(row: dict[str, Any]) -> str:
    """``right / wrong`` prompts against the base model, as shares of the suite (per context
    when the suite has both)."""
    flips = row.get("flips")
    if not flips or not flips["n"]:
        return "–"
    by_context = flips.get("by_context") or {}
    if len(by_context) > 1:
        return "; ".join(f"{context} {_flips(c)}" for context, c in by_context.items())
    return _flips(flips)


def _flips(counts: dict[str, Any]) -> str:
    n = counts["n"]
    return (f"{counts['right_way'] / n:.2f} / {counts['wrong_way'] / n:.2f} "
            f"({counts['right_way']} / {counts['wrong_way']})")


def gate_line(row: dict[str, Any]) -> str:
    """A gated policy's gate on the suite: AUROC and rows per side."""
    g = row["gate"]
    auc = "" if g.get("auroc") is None else f"AUROC harmful vs benign {g['auroc']}; "
    return (f"{row['label']}: gate of rail {g['rail']}: {auc}steered towards answering "
            f"{g['answer']} (below {g['below']}), towards refusing {g['refuse']} "
            f"(above {g['above']})")


def timing_cell(row: dict[str, Any]) -> str:
    """Answers that open compliant and refuse later / open refusing and answer after all."""
    timing = row.get("timing")
    return "–" if not timing else f"{timing['refuses_late']} / {timing['recovers']}"


def budget_line(row: dict[str, Any]) -> str:
    """Whether a calibrated policy kept its safety budget on this suite, rule by rule."""
    b = row["budget"]
    parts = []
    if "refusal_held" in b:
        parts.append(f"harmful refusal >= base - {b['max_refusal_drop']}: "
                     f"{'held' if b['refusal_held'] else 'BROKEN'}")
    parts.append(f"wrong-way flips <= {b['max_wrong_way']}: "
                 f"{'held' if b['wrong_way_held'] else 'BROKEN'}")
    return f"{row['label']}: safety budget {'held' if b['held'] else 'BROKEN'} ({'; '.join(parts)})"


def kl_table(kl: dict[str, Any]) -> list[str]:
    """Markdown table of the capability guard."""
    lines = ["| policy | mean KL (nats/token) | worst prompt | prompts | tokens |",
             "|---|---|---|---|---|"]
    for label, value in kl.items():
        lines.append(f"| {label} | {value['mean_kl_per_token']:.4f} | {value['max_prompt_kl']:.4f} "
                     f"| {value['prompts']} | {value['tokens']} |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The Markdown summary of a JSON report."""
    s = report["settings"]
    lines = ["# Evaluation report", ""]
    if report.get("command"):
        lines += ["```", report["command"], "```", ""]
    lines += [
        f"Created {report['created']}. Generation: max_new_tokens={s.get('max_new_tokens')}, "
        f"{'sampling' if s.get('do_sample') else 'greedy'}; classifier: {s.get('classifier')}; "
        f"limit per suite: {s.get('limit') or 'all'} (seed {s.get('seed')}).",
        "Rates with 95% Wilson intervals and counts; (±x.xx) is the difference to the base model. "
        "Clean compliance also requires the answer to be neither empty nor degenerate; "
        "'cut off' answers hit max_new_tokens (expected for long answers).",
        "",
    ]
    lines += suite_sections(report)
    if report.get("kl"):
        lines += ["## Capability guard: KL(base ‖ steered) on benign answers", ""]
        lines += kl_table(report["kl"]) + [""]
    return "\n".join(lines)


def console(report: dict[str, Any]) -> str:
    """A plain-text side-by-side table per suite for the terminal."""
    out = []
    for suite in report["suites"]:
        out.append(f"{suite['name']}  ({suite['benign']} benign, {suite['harmful']} harmful)")
        width = max(len("policy"), *(len(r["label"]) for r in suite["rows"])) + 2
        header = f"  {'policy':<{width}}{'benign compliance':<36}{'harmful refusal':<36}bad answers"
        out.append(header)
        for row in suite["rows"]:
            q = row["quality"]
            bad = f"empty {q['empty']}, degenerate {q['degenerate']}, cut off {q['cut_off']}"
            out.append(f"  {row['label']:<{width}}{str(_rate(row['compliance'])):<36}"
                       f"{str(_rate(row['refusal'])):<36}{bad}")
            if row.get("flips"):
                out.append(f"  {'':<{width}}flips vs base (right / wrong): {flips_cell(row)}; "
                           f"refuses late / recovers: {timing_cell(row)}")
            if row.get("budget"):
                out.append(f"  {'':<{width}}{budget_line(row)}")
        out.append("")
    if report.get("kl"):
        out.append("capability guard: mean KL(base || steered) on benign answers, nats/token")
        for label, value in report["kl"].items():
            out.append(f"  {label}: {value['mean_kl_per_token']:.4f} "
                       f"(worst prompt {value['max_prompt_kl']:.4f}, {value['tokens']} tokens)")
    return "\n".join(out)


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "unnamed"
