"""Built-in guardrail plugins, registered from ``guardrail.plugin.defaults.DEFAULT_PLUGINS``."""
