"""The results page: one config file in, ``docs/results.md`` plus figures and JSON out.

``guardrail report --config bench/results.yaml`` evaluates the listed policies against the
base model, measures the KL capability guard, runs the sweep, and writes a page that states
its settings and the ``guardrail eval``/``guardrail sweep`` commands giving the same numbers.
Answers come from the generation cache, so regenerating the page re-uses earlier runs.
"""

from __future__ import annotations

import os
import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guardrail.errors import PolicyError
from guardrail.evaluation.cache import GenerationCache, default_cache_path
from guardrail.evaluation.kl import capability_guard
from guardrail.evaluation.report import (
    build_report,
    kl_table,
    suite_sections,
    write_report,
    write_sweep,
)
from guardrail.evaluation.runner import contenders_for, evaluate, load_guards
from guardrail.evaluation.suites import SuiteSpec, load_suite
from guardrail.evaluation.sweep import run_sweep, sweep_table
from guardrail.evaluation.targets import Target, target_table
from guardrail.plugin.components import RefusalClassifier
from guardrail.plugin.defaults import CAPABILITY_SUITE, EVAL_SUITES, FILE_SUITE, SWEEP_SUITES
from guardrail.plugin.manager import get_plugin_manager
from guardrail.plugin.registry import Registry
from guardrail.policy.artifacts import missing_artifacts
from guardrail.policy.model import format_validation_error, load_policy
from guardrail.policy.training import GridValue
from guardrail.policy.tuning import shown_value
from guardrail.prompts import resolve_data_dir
from guardrail.steering.generation import merge_settings
from guardrail.steering.guard import Guardrail

log = structlog.get_logger("guardrail.evaluation")


class Strict(BaseModel):
    """Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class KLConfig(Strict):
    """The capability guard: how many benign prompts, how long the base answers."""

    prompts: int = Field(64, ge=0)
    max_new_tokens: int = Field(32, ge=1)


class SweepConfig(Strict):
    """The trade-off sweep: which policies (default: all), suites, size and grid."""

    policies: list[str] | None = None
    suites: list[str] = Field(default_factory=lambda: list(SWEEP_SUITES))
    limit: int | None = None
    grid: dict[str, Annotated[list[GridValue], Field(min_length=1)]] = Field(
        default_factory=dict, description="Steerer params to sweep, {param: [values]}: each "
        "policy's steerers get the params they declare tunable; empty: every policy is a point.")


class ResultsConfig(Strict):
    """A results page: paths are relative to the config file."""

    title: str = "Results"
    output: str = "../docs/results.md"
    assets: str = "../docs/results"
    policies: list[str]
    suites: list[str] = Field(default_factory=lambda: list(EVAL_SUITES))
    limit: int | None = None
    seed: int = 0
    max_new_tokens: int = 48
    batch_size: int | None = None
    classifier: str | None = None
    data_dir: str | None = None
    kl: KLConfig = Field(default_factory=KLConfig)
    sweep: SweepConfig | None = None
    targets: list[Target] = Field(default_factory=list)
    prepare: list[str] = Field(default_factory=list, description="Commands that build artifacts.")
    notes: list[str] = Field(default_factory=list)


def load_config(path: str | Path) -> ResultsConfig:
    """Read and validate a results config; errors name the key path."""
    path = Path(path)
    if not path.is_file():
        raise PolicyError(str(path), ["file not found"])
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    moved = _moved_grid(data)
    if moved:
        raise PolicyError(str(path), moved)
    try:
        return ResultsConfig.model_validate(data or {})
    except ValidationError as exc:
        raise PolicyError(str(path), format_validation_error(exc)) from None


def _moved_grid(data: Any) -> list[str]:
    """Configs written before the sweep grid was keyed by param name listed each param's
    values beside ``policies``: one line per such key, saying where it goes now."""
    sweep = data.get("sweep") if isinstance(data, dict) else None
    if not isinstance(sweep, dict):
        return []
    return [f"sweep.{key}: a steerer param's sweep values now go under sweep.grid "
            f"(grid: {{{key}: {value}}})" for key, value in sweep.items()
            if key not in SweepConfig.model_fields and isinstance(value, list)]


def build_results(
    config_path: str | Path,
    *,
    limit: int | None = None,
    kl_prompts: int | None = None,
    sweep_grid: dict[str, list[Any]] | None = None,
    invocation: str | None = None,
    progress: bool = False,
) -> Path:
    """Run everything the config asks for and write the page; returns its path."""
    config_path = Path(config_path).resolve()
    cfg = _override(load_config(config_path), limit, kl_prompts, sweep_grid)
    invocation = invocation or f"guardrail report --config {_rel(config_path, Path.cwd())}"
    here = config_path.parent
    page = (here / cfg.output).resolve()
    assets = (here / cfg.assets).resolve()
    registry = Registry.from_plugin_manager(get_plugin_manager())
    data_dir = resolve_data_dir(here / cfg.data_dir if cfg.data_dir else None)
    ready, skipped = _ready_policies(cfg, config_path, registry)
    suites = [load_suite(_spec(s, here), registry, data_dir=data_dir, limit=cfg.limit,
                         seed=cfg.seed) for s in cfg.suites]
    guards = load_guards([p for p, _ in ready])
    overrides = {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size or None}
    settings = merge_settings(guards[0].policy.generation, overrides)
    cache = GenerationCache(default_cache_path())
    classifier = _classifier(registry, cfg.classifier)
    contenders = contenders_for(guards)
    results = evaluate(contenders, suites, settings, cache, classifier=classifier,
                       progress=progress)
    kl = None
    if cfg.kl.prompts:
        harmless = load_suite(CAPABILITY_SUITE, registry, data_dir=data_dir, limit=cfg.kl.prompts,
                              seed=cfg.seed)
        kl = capability_guard(contenders, [i.prompt for i in harmless.items],
                              settings.model_copy(update={"max_new_tokens": cfg.kl.max_new_tokens}),
                              cache, progress=progress)
    commands = _commands(cfg, [p for p, _ in ready], data_dir, here)
    report = build_report(results, contenders, command=commands["eval"], kl=kl, settings={
        **settings.model_dump(), "limit": cfg.limit, "seed": cfg.seed, "data_dir": str(data_dir),
        "classifier": cfg.classifier or guards[0].policy.classifier.plugin})
    write_report(report, assets)
    figures: dict[str, Path] = {}
    if kl:
        from guardrail.evaluation.plots import plot_kl

        figures["kl"] = plot_kl(kl, assets / "kl.png")
    sweep_md = None
    if cfg.sweep is not None:
        chosen = _swept(cfg.sweep, guards, here)
        sweep_suites = [load_suite(_spec(s, here), registry, data_dir=data_dir,
                                   limit=cfg.sweep.limit, seed=cfg.seed) for s in cfg.sweep.suites]
        points, _ = run_sweep(chosen, sweep_suites, settings, cache, grid=cfg.sweep.grid,
                              progress=progress)
        figures["sweep"] = write_sweep(points, assets)["plot"]
        sweep_md = sweep_table(points)
        commands["sweep"] = _sweep_command(cfg, [g.policy.path for g in chosen], data_dir, here)
    page.parent.mkdir(parents=True, exist_ok=True)
    text = _page(cfg, invocation, page, assets, report, skipped, figures, sweep_md, commands)
    page.write_text(text, encoding="utf-8")
    log.info("results.written", page=str(page), assets=str(assets))
    return page


def _override(cfg: ResultsConfig, limit: int | None, kl_prompts: int | None,
              sweep_grid: dict[str, list[Any]] | None) -> ResultsConfig:
    """``cfg`` with the command line's overrides applied (a grid param replaces the config's
    values of that param)."""
    if limit is not None:
        cfg.limit = limit
        if cfg.sweep is not None:
            cfg.sweep.limit = limit
    if kl_prompts is not None:
        cfg.kl.prompts = kl_prompts
    if cfg.sweep is not None and sweep_grid:
        cfg.sweep.grid = {**cfg.sweep.grid, **sweep_grid}
    return cfg


def _ready_policies(cfg: ResultsConfig, config_path: Path, registry: Registry
                    ) -> tuple[list[tuple[Path, list[str]]], list[tuple[Path, list[str]]]]:
    """(ready, skipped): the policies whose artifacts exist, and the others with notes why."""
    ready: list[tuple[Path, list[str]]] = []
    skipped: list[tuple[Path, list[str]]] = []
    for item in cfg.policies:
        path = (config_path.parent / item).resolve()
        notes = missing_artifacts(load_policy(path), registry)
        (skipped if notes else ready).append((path, notes))
    if not ready:
        raise PolicyError(str(config_path), ["policies: no policy has its artifacts built yet"] +
                          [n for _, notes in skipped for n in notes])
    return ready, skipped


def _classifier(registry: Registry, name: str | None) -> RefusalClassifier | None:
    """The classifier every policy is scored with, if the config names one."""
    if not name:
        return None
    created = registry.create("refusal_classifier", name, {})
    assert isinstance(created, RefusalClassifier)
    return created


def _swept(sweep: SweepConfig, guards: list[Guardrail], here: Path) -> list[Guardrail]:
    """The guardrails of the policies the sweep names (by name or path), else all."""
    if sweep.policies is None:
        return guards
    paths = {str((here / p).resolve()) for p in sweep.policies}
    return [g for g in guards if g.policy.name in sweep.policies or str(g.policy.path) in paths]


def _spec(text: str, here: Path) -> SuiteSpec:
    """A suite name, or a user file resolved against the config's folder."""
    spec = SuiteSpec.parse(text)
    if spec.plugin == FILE_SUITE:
        spec.params["path"] = str((here / spec.params["path"]).resolve())
    return spec


def _suite_arg(text: str, here: Path) -> str:
    """The ``--suite`` value that names the same suite from the current directory."""
    spec = _spec(text, here)
    if spec.plugin != FILE_SUITE:
        return text
    label = spec.params.get("label")
    return _rel(spec.params["path"], Path.cwd()) + (f":{label}" if label else "")


def _rel(path: Path | str, start: Path) -> str:
    return os.path.relpath(Path(path).resolve(), start)


def _commands(cfg: ResultsConfig, policies: list[Path], data_dir: Path, here: Path
              ) -> dict[str, str]:
    root = Path.cwd()
    args = ["guardrail", "eval"]
    for p in policies:
        args += ["--policy", _rel(p, root)]
    for s in cfg.suites:
        args += ["--suite", _suite_arg(s, here)]
    if cfg.limit:
        args += ["--limit", str(cfg.limit)]
    args += ["--seed", str(cfg.seed), "--max-new-tokens", str(cfg.max_new_tokens)]
    if cfg.batch_size:
        args += ["--batch-size", str(cfg.batch_size)]
    if cfg.classifier:
        args += ["--classifier", cfg.classifier]
    if cfg.kl.prompts:
        args += ["--kl-prompts", str(cfg.kl.prompts), "--kl-max-new-tokens",
                 str(cfg.kl.max_new_tokens)]
    if cfg.data_dir:  # otherwise the default ($GUARDRAIL_DATA or ../shared/data) applies
        args += ["--data-dir", _rel(data_dir, root)]
    args += ["--save-generations"]
    return {"eval": shlex.join(args)}


def _sweep_command(cfg: ResultsConfig, policies: list[Path | None], data_dir: Path, here: Path
                   ) -> str:
    assert cfg.sweep is not None
    root = Path.cwd()
    args = ["guardrail", "sweep"]
    for p in policies:
        args += ["--policy", _rel(p or "?", root)]
    for s in cfg.sweep.suites:
        args += ["--suite", _suite_arg(s, here)]
    if cfg.sweep.limit:
        args += ["--limit", str(cfg.sweep.limit)]
    args += ["--seed", str(cfg.seed), "--max-new-tokens", str(cfg.max_new_tokens)]
    for name, values in cfg.sweep.grid.items():
        args += ["--grid", f"{name}={','.join(shown_value(v) for v in values)}"]
    if cfg.data_dir:
        args += ["--data-dir", _rel(data_dir, root)]
    if cfg.batch_size:
        args += ["--batch-size", str(cfg.batch_size)]
    return shlex.join(args)


def _page(cfg: ResultsConfig, invocation: str, page: Path, assets: Path, report: dict[str, Any],
          skipped: list[tuple[Path, list[str]]], figures: dict[str, Path], sweep_md: str | None,
          commands: dict[str, str]) -> str:
    s = report["settings"]
    root = Path.cwd()
    lines = [f"# {cfg.title}", "",
             f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} by "
             f"`{invocation}` (run from the project root); "
             "do not edit by hand.", ""]
    if cfg.limit:
        lines += [f"> **Small run:** each suite is a seeded sample of at most {cfg.limit} items. "
                  "Wide intervals; rerun without `limit` for the headline numbers.", ""]
    lines += ["## Settings", "",
              f"- model: `{report['contenders'][0]['model']}`; base = first policy, unsteered",
              f"- generation: {'sampling' if s['do_sample'] else 'greedy'}, "
              f"max_new_tokens={s['max_new_tokens']}, batch_size={s['batch_size']}",
              f"- refusal classifier: `{s['classifier']}`; rates with 95% Wilson intervals",
              f"- data: `{_rel(s['data_dir'], root)}`, seed {s['seed']}, limit "
              f"{s['limit'] or 'none (full suites)'}", ""]
    lines += ["| policy | rails |", "|---|---|"]
    for c in report["contenders"]:
        rails = "; ".join(
            f"{r['name']}: {r['steerer']['plugin']} {r['steerer']['params'] or ''} at layers "
            f"{r['layers']}" + (f", {r['energy_model']['plugin']} energy"
                                if r.get("energy_model") else "")
            for r in c["rails"]) or "unsteered"
        lines.append(f"| {c['label']} | {rails} |")
    for path, notes in skipped:
        lines.append(f"| {path.stem} | *skipped: {'; '.join(notes)}* |")
    lines.append("")
    if cfg.targets:
        lines += ["## Targets", "", "Each steered policy against the project's goals "
                  "(base = the unsteered model on the same items).", ""]
        lines += target_table(cfg.targets, report) + [""]
    lines += suite_sections(report)
    if report.get("kl"):
        lines += ["## Capability guard", "",
                  "Mean KL(base ‖ steered) of the next-token distribution over the base model's "
                  f"greedy answers ({cfg.kl.max_new_tokens} tokens at most) to {cfg.kl.prompts} "
                  f"{CAPABILITY_SUITE} prompts, teacher-forced with the steering hooks on and off.",
                  ""]
        lines += kl_table(report["kl"]) + [""]
        if "kl" in figures:
            lines += [f"![KL per answer position]({_rel(figures['kl'], page.parent)})", ""]
    lines += ["Multiple-choice accuracy is not reported: no freely usable multiple-choice set "
              "is available offline on this project's machines.", ""]
    if sweep_md:
        lines += ["## Trade-off sweep", "", sweep_md, ""]
        if "sweep" in figures:
            lines += [f"![trade-off]({_rel(figures['sweep'], page.parent)})", ""]
    lines += ["## Reproduce", "", "```sh"]
    lines += [*cfg.prepare, commands["eval"]]
    if "sweep" in commands:
        lines.append(commands["sweep"])
    lines += ["```", "", f"Raw numbers: `{_rel(assets / 'report.json', page.parent)}` "
              "(every rate, interval and count).", ""]
    if cfg.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in cfg.notes], ""]
    return "\n".join(lines)
