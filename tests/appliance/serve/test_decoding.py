"""Detokenizing for streams with the real tiny tokenizer: stop sequences that span tokens, held-back
prefixes, multi-byte characters, and streamed pieces that join to exactly the final text."""

from __future__ import annotations

import pytest

from appliance.serve.decoding import TextStream
from tests.conftest import REPO


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REPO / "models" / "tiny-deepseek-r1", local_files_only=True)


def _stream(tokenizer, text: str, stops: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stops)
    pieces = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    return [p for p in pieces if p], stream


@pytest.mark.parametrize(("text", "stops", "expected"), [
    ("Check the limit switch first. Then the belt.", ["switch f"], "Check the limit "),
    ("Check the limit switch first. Then the belt.", ["."], "Check the limit switch first"),
    ("Check the limit switch first. Then the belt.", ["nothing", "Then"], "Check the limit switch first. "),
    ("Check the limit switch first. Then the belt.", ["belt.!"], "Check the limit switch first. Then the belt."),
    ("Temperatur 80 °C, Grüße aus Halle 温度", [], "Temperatur 80 °C, Grüße aus Halle 温度"),
    ("Temperatur 80 °C, Grüße aus Halle 温度", ["°"], "Temperatur 80 "),
])
def test_pieces_join_to_the_text_before_the_first_stop(tokenizer, text, stops, expected):
    pieces, stream = _stream(tokenizer, text, stops)
    assert "".join(pieces) == expected
    assert stream.stopped == (expected != text)
    for piece in pieces:
        assert "\ufffd" not in piece  # never half of a multi-byte character
        assert not any(stop in piece for stop in stops)


def test_a_possible_stop_prefix_is_held_back_until_it_is_decided(tokenizer):
    stream = TextStream(tokenizer, ["STOP"])
    shown = ""
    for token in tokenizer("the pump ST", add_special_tokens=False)["input_ids"]:
        shown += stream.push(token)
    assert shown == "the pump "  # 'ST' may begin STOP: not shown yet
    for token in tokenizer("ALL", add_special_tokens=False)["input_ids"]:
        shown += stream.push(token)
    assert shown + stream.finish() == "the pump STALL" and not stream.stopped
