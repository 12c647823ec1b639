"""Answers as they are generated, and the padding check of ``Guardrail.attach``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import torch

from guardrail.errors import GuardrailError

__all__ = ["GenerationStream", "PaddingError", "refuse_right_padding"]


class PaddingError(GuardrailError, ValueError):
    """A batch is right-padded where steering needs each row's last prompt token last."""


def refuse_right_padding(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """A forward pre-hook (``with_kwargs=True``) raising :class:`PaddingError` for a batch
    whose attention mask ends in 0 on some row."""
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:
        mask = args[1]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] < 2:
        return
    padded = (mask[:, -1] == 0).nonzero().flatten().tolist()
    if padded:
        raise PaddingError(
            f"Guardrail.attach: rows {padded} of the batch are right-padded (their attention "
            "mask ends in 0), so their last position is padding, not the last prompt token "
            "the rails steer; tokenise with padding_side='left' (tokenizer.padding_side = "
            "'left'), as generation with a decoder-only model needs anyway"
        )


class GenerationStream:
    """An answer's text as it is generated (iterate it); ``result`` once it has finished.

    Generation runs in a background thread; an error there is raised by the iteration.
    """

    def __init__(self, streamer: Any, run: Any) -> None:
        self.result: Any = None  # the GenerationResult, once finished
        self._streamer = streamer
        self._error: BaseException | None = None
        self._consumed = False

        def target() -> None:
            try:
                self.result = run()
            except BaseException as exc:  # re-raised in the consumer's thread
                self._error = exc
                streamer.end()

        self._thread = threading.Thread(target=target, name="guardrail-stream", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[str]:
        if not self._consumed:
            self._consumed = True
            for text in self._streamer:
                if text:
                    yield text
        self._thread.join()
        if self._error is not None:
            raise self._error

    @property
    def text(self) -> str:
        """The whole answer (after iterating, or waiting for it now)."""
        if self.result is None:
            for _ in self:
                pass
        assert self.result is not None
        return self.result.text
