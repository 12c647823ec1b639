"""Linear baselines EDS is compared with, built from the same plugin interfaces.

* ``linear`` energy model: E(h) = <h - mu, r_hat>, where ``r_hat`` is the unit difference of
  mean states on harmful and benign prompts and ``mu`` their midpoint (E > 0 looks harmful).
  ``guardrail baseline directions`` (this plugin's command) computes it. With the
  ``gradient-descent`` steerer and ``normalize: true`` the gradient is ``r_hat`` itself, so
  EDS's update *is* contrastive activation addition along ``-r_hat`` (Rimsky et al. 2024).
* ``ablate`` steerer: projects ``r_hat`` out of the states (Arditi et al. 2024, "Refusal in
  language models is mediated by a single direction").
* ``system-prompt`` steerer: prompt-only; rewrites the system message, touches no state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from guardrail_plugins.baselines.command import add_parser
from guardrail_plugins.baselines.components import (
    DEFAULT_SYSTEM_PROMPT,
    AblateParams,
    AblateSteerer,
    LinearEnergyParams,
    SystemPromptParams,
    SystemPromptSteerer,
)

from guardrail import Register, hookimpl

if TYPE_CHECKING:
    import argparse

    from guardrail_plugins.baselines.linear import LinearEnergyModel

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "AblateParams",
    "AblateSteerer",
    "LinearEnergyModel",
    "LinearEnergyParams",
    "SystemPromptParams",
    "SystemPromptSteerer",
]


@hookimpl
def guardrail_register_energy_models(register: Register) -> None:
    # An nn.Module: named by path so registering it imports no torch (see .linear).
    register("guardrail_plugins.baselines.linear:LinearEnergyModel", name="linear",
             aliases=("difference-of-means",), params=LinearEnergyParams,
             artifact_command="guardrail baseline directions --policy {policy}")


@hookimpl
def guardrail_register_steerers(register: Register) -> None:
    register(AblateSteerer, aliases=("directional-ablation", "refusal-ablation"))
    register(SystemPromptSteerer, aliases=("system_prompt", "prompt"))


@hookimpl
def guardrail_register_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    add_parser(subparsers)


def __getattr__(name: str) -> Any:
    if name == "LinearEnergyModel":  # imports torch: only when asked for
        from guardrail_plugins.baselines.linear import LinearEnergyModel

        return LinearEnergyModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
