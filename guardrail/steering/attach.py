"""``Guardrail.attach()``: steering a model object's own ``generate`` and forward calls.

The rails steer through the same :class:`~guardrail.steering.hooks.SteeringSession` as
``generate``; a forward pre-hook refuses right-padded batches, and another runs the rails'
gates on each new prompt, reading the user's last message back from the token ids.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import structlog
import torch

from guardrail.artifact.energy import EnergyArtifact
from guardrail.models.fingerprint import model_fingerprint
from guardrail.steering.batches import Runtime
from guardrail.steering.generation import UserMessageParser
from guardrail.steering.hooks import SteeringSession
from guardrail.steering.streams import refuse_right_padding

if TYPE_CHECKING:
    from transformers import PreTrainedModel


log = structlog.get_logger("guardrail")


@contextlib.contextmanager
def attached(guard: Runtime, model: PreTrainedModel | None = None, *,
             strength: float | None = None) -> Iterator[SteeringSession]:
    """Steer ``model.generate(...)`` / forward calls on a model object of your own.

    The model must be the one the artifacts were trained for (checked by fingerprint).
    Prompts must be left-padded, as Hugging Face generation wants them: a row's last
    prompt token is then the last position, which the rails steer. A right-padded batch
    (an attention mask ending in 0) is refused with :class:`PaddingError`, since its
    last position would be padding.

    Gated rails apply their gates exactly as :meth:`Guardrail.generate` does: on each new prompt
    (a forward pass that starts a sequence) the user's last message is read back from the
    token ids through the chat template, scored, and each row is steered towards the side
    its gate chooses, or not at all. A row whose user message cannot be found (a prompt
    not rendered with this tokenizer's chat template, or ``inputs_embeds``) is not steered.

    ``strength`` multiplies each rail's calibrated step size while attached, up to what
    its calibration allows (:meth:`Guardrail.rails_at`).
    """
    target = model if model is not None else guard.model
    if target is not guard.model:
        fingerprint = model_fingerprint(target, guard.loaded.name)
        for rail in guard.rails:
            if rail.energies or rail.directions:
                EnergyArtifact.compare(rail.fingerprint, fingerprint, f"rail {rail.name!r}")
    check = target.register_forward_pre_hook(refuse_right_padding, with_kwargs=True)
    handles = [check]
    try:
        with guard.session(model=target, strength=strength) as session:
            if any(rail.gate is not None for rail in guard.rails):
                handles.append(target.register_forward_pre_hook(
                    _AttachGate(guard, session, target), with_kwargs=True))
            yield session
    finally:
        for handle in handles:
            handle.remove()


class _AttachGate:
    """A forward pre-hook that runs the rails' gates on each new prompt under ``attach()``."""

    def __init__(self, guard: Runtime, session: SteeringSession, model: PreTrainedModel
                 ) -> None:
        self.guard = guard
        self.session = session
        self.model = model
        self.parse = UserMessageParser(guard.tokenizer)

    def __call__(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.session.paused:
            return  # the gate's own forward pass
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            # No token ids (inputs_embeds): nothing to read the prompt from. Fail closed.
            if _starts_sequence(kwargs, None):
                self.session.set_rows(self._nothing())
                log.warning("attach.gate_unreadable", reason="no input_ids",
                            action="gated rails steer no row")
            return
        if not _starts_sequence(kwargs, input_ids):
            return
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape:
            mask = torch.ones_like(input_ids)
        prompts = [self.parse.from_ids(row[m.bool()].tolist())
                   for row, m in zip(input_ids, mask, strict=True)]
        readable = torch.tensor([p is not None for p in prompts], device=input_ids.device)
        if not bool(readable.all()):
            log.warning("attach.gate_unreadable", rows=(~readable).nonzero().flatten().tolist(),
                        reason="no user message found through the chat template",
                        action="those rows are not steered")
        self.session.paused = True
        try:
            decisions = self.guard.gate([p or "" for p in prompts],
                                        {"input_ids": input_ids, "attention_mask": mask},
                                        model=self.model)
        finally:
            self.session.paused = False
        rows = {name: {side: rows & readable for side, rows in sides.items()}
                for name, (_, sides) in decisions.items()}
        self.session.set_rows(rows)
        self.session.gate_decisions = decisions

    def _nothing(self) -> dict[str, dict[str, torch.Tensor]]:
        return {rail.name: {} for rail in self.guard.rails if rail.gate is not None}


def _starts_sequence(kwargs: dict[str, Any], input_ids: torch.Tensor | None) -> bool:
    """Whether a forward call starts a new sequence (a prompt) rather than continuing one."""
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position.reshape(-1)[0]) == 0
    # transformers 5 passes the cache as ``cache``, 4.x as ``past_key_values``.
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return True
    length = getattr(cache, "get_seq_length", None)
    if callable(length):
        return int(length()) == 0
    return input_ids is not None and input_ids.shape[1] > 1
