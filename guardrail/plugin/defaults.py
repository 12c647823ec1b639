"""The built-in plugins and the component names the core falls back on.

The one place the core names a plugin: the modules registered as built-ins, the components a
policy gets when it names none, and the suites the evaluation commands use by default (and the
shipped policy the demo runs). A third-party package registers through the ``guardrail``
entry-point group instead.
"""

from __future__ import annotations

# entry-point name -> module, registered in this order by ``build_plugin_manager``.
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("residual_stream", "guardrail_plugins.residual_stream"),
    ("mlp_energy", "guardrail_plugins.mlp_energy"),
    ("gradient_steerer", "guardrail_plugins.gradient_steerer"),
    ("gates", "guardrail_plugins.gates"),
    ("heuristic_classifier", "guardrail_plugins.heuristic_classifier"),
    ("judge_classifier", "guardrail_plugins.judge_classifier"),
    ("refusal_rail", "guardrail_plugins.refusal_rail"),
    ("suites", "guardrail_plugins.suites"),
    ("baselines", "guardrail_plugins.baselines"),
)

# The shipped policy `guardrail demo` runs and `guardrail policy init` starts from.
DEFAULT_POLICY = "eds-qwen2.5-coder-0.5b"

# component kind -> the registered name a policy gets when it names none.
DEFAULT_COMPONENTS: dict[str, str] = {
    "activation_source": "residual-stream",
    "energy_model": "mlp",
    "steerer": "gradient-descent",
    "refusal_classifier": "heuristic",
}

# Suites by use: `guardrail eval`, `guardrail sweep`, and the capability guard's benign prompts.
EVAL_SUITES: tuple[str, ...] = ("xstest", "orbench-val", "harmful-val")
SWEEP_SUITES: tuple[str, ...] = ("orbench-val", "harmful-val")
CAPABILITY_SUITE = "harmless-val"
# The suite that reads a user's prompt file (``PATH[:benign|:harmful]`` on the command line).
FILE_SUITE = "file"
