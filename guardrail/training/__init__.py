"""Training energy models from prompt sets: sources, labelling, state capture, training, selection.

``guardrail train --policy P`` runs :func:`guardrail.training.pipeline.train_policy`; the
policy's ``training:`` section (:class:`guardrail.policy.training.TrainingSection`) says what
to train on. Importing this package stays light: submodules load torch when used.
"""
