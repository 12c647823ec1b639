"""The steering runtime: a loaded policy generating with its hidden states steered.

- :mod:`~guardrail.steering.guard`: :class:`Guardrail`, the entry point (generate, stream,
  attach, energies, gate scores, classify);
- :mod:`~guardrail.steering.rails`: a rail as the hooks run it; :mod:`~guardrail.steering.build`:
  a policy's rails built from the registry and their artifacts;
- :mod:`~guardrail.steering.batches`: the one path every call takes: render, batch, gate,
  generate; :mod:`~guardrail.steering.attach`: the same on a model object's own ``generate``;
- :mod:`~guardrail.steering.gating`: which rows a rail steers, towards which side;
- :mod:`~guardrail.steering.hooks`: the forward hooks where the hidden state is changed;
- :mod:`~guardrail.steering.capture`: hidden states read without steering (training, gates);
- :mod:`~guardrail.steering.generation`, :mod:`~guardrail.steering.streams`: conversations,
  settings, end of sequence; answers streamed;
- :mod:`~guardrail.steering.output_rails`: finished answers reviewed, rows answered again;
- :mod:`~guardrail.steering.prerequisites`: what a policy needs installed.
"""
