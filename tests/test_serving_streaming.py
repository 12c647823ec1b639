"""Per-row decoding of a served batch: UTF-8 safe deltas, stop sequences, early row stops."""

from __future__ import annotations

import pytest
import torch

from guardrail.serving.streaming import BatchRows, RowText, sse


@pytest.fixture(scope="module")
def byte_tokenizer():  # type: ignore[no-untyped-def]
    """A byte-level tokenizer without merges: every UTF-8 byte is its own token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["x"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def _ids(tokenizer, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _feed(row: RowText, ids: list[int]) -> None:
    for token in ids:
        if row.done:
            break
        row.add(token)
        row.flush()


def test_deltas_never_split_a_character_and_join_to_the_text(byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "café 🙂 naïve — ok"
    ids = _ids(byte_tokenizer, text)
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    deltas: list[str] = []
    row = RowText(byte_tokenizer, max_tokens=1000, sink=deltas.append)
    _feed(row, ids)
    row.finish("stop")
    assert "".join(deltas) == text == row.text
    assert not any("\ufffd" in delta for delta in deltas)
    assert len(deltas) > 5  # streamed piece by piece, not at the end


def test_stop_sequence_across_tokens_is_cut_and_never_streamed(byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    deltas: list[str] = []
    row = RowText(byte_tokenizer, max_tokens=1000, stop=["STOP", "never"], sink=deltas.append)
    ids = _ids(byte_tokenizer, "hello STOP world")
    _feed(row, ids)
    assert row.finish_reason == "stop"
    assert row.text == "hello " and "".join(deltas) == "hello "
    assert len(row.ids) == len(_ids(byte_tokenizer, "hello STOP"))  # ended right at the stop


def test_partial_stop_prefix_is_released_when_it_does_not_complete(byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    deltas: list[str] = []
    row = RowText(byte_tokenizer, max_tokens=1000, stop=["STOP"], sink=deltas.append)
    _feed(row, _ids(byte_tokenizer, "a STO"))
    assert "".join(deltas) == "a "  # "STO" may still become "STOP": held back
    _feed(row, _ids(byte_tokenizer, "RE"))
    assert "".join(deltas) == "a STORE"
    assert not row.done


def test_max_tokens_ends_the_row_with_length(byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    row = RowText(byte_tokenizer, max_tokens=3)
    _feed(row, _ids(byte_tokenizer, "abcdef"))
    assert row.finish_reason == "length" and row.text == "abc" and len(row.ids) == 3


def test_batch_rows_end_each_row_for_its_own_reason(byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    eos = byte_tokenizer.eos_token_id
    cancel = {"now": False}
    rows = [
        RowText(byte_tokenizer, max_tokens=100),
        RowText(byte_tokenizer, max_tokens=2),
        RowText(byte_tokenizer, max_tokens=100, cancelled=lambda: cancel["now"]),
    ]
    stopper = BatchRows(rows, {eos})
    a, b = _ids(byte_tokenizer, "a")[0], _ids(byte_tokenizer, "b")[0]
    ids = torch.tensor([[0], [0], [0]])
    steps = [[a, b, a], [eos, b, a], [a, a, a]]
    results = []
    for step, tokens in enumerate(steps):
        if step == 2:
            cancel["now"] = True
        ids = torch.cat([ids, torch.tensor(tokens)[:, None]], dim=1)
        results.append(stopper(ids, None).tolist())  # type: ignore[arg-type]
    assert results == [[False, False, False], [True, True, False], [True, True, True]]
    assert [r.finish_reason for r in rows] == ["stop", "length", "cancelled"]
    # Tokens fed to a finished row (padding) are not part of its answer.
    assert [r.text for r in rows] == ["a", "bb", "aa"]


def test_close_marks_open_rows_as_length(byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    rows = [RowText(byte_tokenizer, max_tokens=10), RowText(byte_tokenizer, max_tokens=10)]
    rows[0].finish("stop")
    BatchRows(rows, set()).close()
    assert [r.finish_reason for r in rows] == ["stop", "length"]


def test_sse_frames_json_and_done() -> None:
    assert sse({"a": 1}) == b'data: {"a":1}\n\n'
    assert sse("[DONE]") == b"data: [DONE]\n\n"
