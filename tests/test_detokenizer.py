"""The incremental detokenizer: streamed text equals the whole decode, cut before the first
stop string, whatever the stop strings and wherever tokens split characters."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sarathi_common.model_spec import resolve
from scheduler_service.detokenizer import IncrementalDetokenizer
from scheduler_service.tokenizer import load_tokenizer

PROMPT = 4


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve(None))


def stream(tokenizer, ids: list[int], stop: list[str]) -> tuple[str, bool]:
    detok = IncrementalDetokenizer(tokenizer, ids[:PROMPT], stop)
    text = ""
    for token in ids[PROMPT:]:
        step = detok.add([token])
        text += step.text
        if step.stopped:
            return text, True
    return text + detok.flush(), False


ALPHABET = "ab \né"   # é spans two bytes: byte-level BPE splits it across tokens at times


@settings(max_examples=150, deadline=None)
@given(text=st.text(ALPHABET, min_size=8, max_size=60),
       stop=st.lists(st.text(ALPHABET, min_size=1, max_size=6), max_size=4))
def test_streamed_text_is_the_whole_text_cut_before_the_first_stop(tokenizer, text, stop):
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= PROMPT:
        return
    whole, _ = stream(tokenizer, ids, [])
    hits = [whole.find(s) for s in stop if s in whole]
    got, stopped = stream(tokenizer, ids, stop)
    assert stopped == bool(hits)
    assert got == (whole[:min(hits)] if hits else whole)
