"""Built-in guardrail plugins, registered through the ``guardrail`` entry-point group."""
