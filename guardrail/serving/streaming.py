"""Per-row decoding of a batched ``generate``: text deltas, stop sequences, early stops.

transformers calls a stopping criterion once per decoding step with the whole batch's ids,
*before* it hands the step to a streamer. So one object, :class:`BatchRows`, both splits the
batch into rows (one per request) and ends rows early: at the end-of-sequence token, at the
request's own ``max_tokens`` (requests with different limits share a batch), at a stop
sequence, or when the request was cancelled (client gone, timeout). Finished rows then only
receive padding, and the batch ends when every row has finished.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria

TextSink = Callable[[str], None]


class RowText:
    """One request's generated tokens, decoded incrementally into text.

    Decodes a short window of ids around the newest token (not the whole answer) each step,
    and holds back text that may still change: an incomplete UTF-8 character, or a tail that
    could be the start of a stop sequence.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_tokens: int,
        stop: Sequence[str] = (),
        sink: TextSink | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.stop = list(stop)
        self.sink = sink
        self.cancelled = cancelled or (lambda: False)
        self.ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._sent = 0
        self._prefix_offset = 0
        self._read_offset = 0

    @property
    def done(self) -> bool:
        """Whether this row has finished (any reason)."""
        return self.finish_reason is not None

    def add(self, token: int) -> None:
        """Append a generated token; may finish the row at a stop sequence or at ``max_tokens``."""
        self.ids.append(token)
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        window = self._decode(self.ids[self._prefix_offset :])
        if len(window) > len(prefix) and not window.endswith("\ufffd"):
            searched_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
            self.text += window[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            self._cut_at_stop(searched_from)
        if not self.done and len(self.ids) >= self.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        """End the row (the first reason wins) and send whatever text was held back."""
        if self.finish_reason is None:
            self.finish_reason = reason
        self.flush()

    def flush(self) -> None:
        """Hand the text that is safe to show to the sink."""
        end = len(self.text) if self.done else len(self.text) - self._held_back()
        if end > self._sent:
            delta, self._sent = self.text[self._sent : end], end
            if self.sink is not None:
                self.sink(delta)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _cut_at_stop(self, searched_from: int) -> None:
        hits = [i for s in self.stop if (i := self.text.find(s, searched_from)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish("stop")

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop sequence."""
        held = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:size]):
                    held = size
                    break
        return held


class BatchRows(StoppingCriteria):
    """The stopping criterion of one served batch: row ``i`` is request ``i``."""

    def __init__(self, rows: Sequence[RowText], eos_ids: set[int]) -> None:
        self.rows = list(rows)
        self.eos_ids = eos_ids
        #: ``time.perf_counter()`` at the first call: when the first token was generated.
        self.first_step_at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if self.first_step_at is None:
            self.first_step_at = time.perf_counter()
        newest = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, newest, strict=True):
            if row.done:
                continue  # finished rows are fed padding; ignore it
            if row.cancelled():
                row.finish("cancelled")
            elif token in self.eos_ids:
                row.finish("stop")
            else:
                row.add(token)
                row.flush()
        done = [row.done for row in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]

    def close(self) -> None:
        """After ``generate`` returns: rows still open ran into the batch's length limit."""
        for row in self.rows:
            row.finish("length")


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
