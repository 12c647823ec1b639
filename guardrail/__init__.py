"""guardrail: energy-driven steering of a local chat model's hidden states, built from plugins."""

from guardrail.plugin.markers import Register, hookimpl

__version__ = "0.1.0"
__all__ = ["Guardrail", "Register", "hookimpl", "__version__"]


def __getattr__(name: str) -> object:
    # Importing torch/transformers is slow; `from guardrail import hookimpl` should not pay it.
    if name == "Guardrail":
        from guardrail.steering.guard import Guardrail

        return Guardrail
    raise AttributeError(f"module 'guardrail' has no attribute {name!r}")
