"""Built-in guardrail plugins, registered from ``guardrail.defaults.DEFAULT_PLUGINS``."""
