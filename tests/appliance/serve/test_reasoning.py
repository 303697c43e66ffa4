"""R1 reasoning apart from the answer (DeepSeek's `reasoning_content`), the model's sampling defaults and
max_tokens within the model's context: the splitter on real token streams of the tiny tokenizer, the
request-to-sampling arithmetic, and the official `openai` client against the shared server."""

from __future__ import annotations

import json

import pytest

from appliance.serve.decoding import ReasoningSplitter, TextStream, opens_reasoning, think_tokens
from appliance.serve.errors import RequestRefused
from appliance.serve.limits import ServeLimits
from appliance.serve.openai_api import parse_chat_request
from tests.conftest import REPO

TINY = REPO / "models" / "tiny-deepseek-r1"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY, local_files_only=True)


def _split(tokenizer, text: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Token by token through TextStream then the splitter, as `complete` does: the pieces and the joined texts."""
    stream, splitter, pieces = TextStream(tokenizer, [], think_tokens(tokenizer)), ReasoningSplitter(), []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        pieces += splitter.push(stream.push(token))
    pieces += splitter.push(stream.finish()) + splitter.finish()
    joined = {"reasoning": "", "content": ""}
    for channel, piece in pieces:
        joined[channel] += piece
    return pieces, joined


def test_the_tiny_r1_template_opens_a_think_block(tokenizer):
    assert opens_reasoning(tokenizer)
    # Its tokenizer marks the tags special (decoding drops them); the stream keeps them to split at.
    assert sorted(think_tokens(tokenizer).values()) == ["</think>", "<think>"]
    assert tokenizer.decode(tokenizer("a </think> b", add_special_tokens=False)["input_ids"],
                            skip_special_tokens=True) == "a  b"


@pytest.mark.parametrize(("text", "reasoning", "content"), [
    ("The belt slips.\nCheck tension.\n</think>\n\nTighten the belt to 40 N.", "The belt slips.\nCheck tension.",
     "Tighten the belt to 40 N."),
    ("<think>\nRepeated tag.</think>Answer.", "Repeated tag.", "Answer."),
    ("Still thinking about the pump </thi", "Still thinking about the pump </thi", ""),  # never closed
    ("</think>Only an answer.", "", "Only an answer."),
    ("Grüße 温度 </think> 80 °C", "Grüße 温度", "80 °C"),
])
def test_reasoning_and_content_split_at_the_closing_tag(tokenizer, text, reasoning, content):
    pieces, joined = _split(tokenizer, text)
    assert joined == {"reasoning": reasoning, "content": content}
    channels = [c for c, _ in pieces]
    assert channels == sorted(channels, key=lambda c: c == "content")  # all reasoning, then all content
    assert not any("</think>" in p for _, p in pieces if "</thi" not in text[-6:])


def test_a_partial_closing_tag_is_held_back_until_decided():
    splitter = ReasoningSplitter()
    assert splitter.push("Pressure low. </th") == [("reasoning", "Pressure low.")]
    assert splitter.push("ink>  Open valve") == [("content", "Open valve")]
    assert splitter.push(" V3.") == [("content", " V3.")] and splitter.finish() == []


def _request(**fields) -> object:
    return parse_chat_request({"messages": [{"role": "user", "content": "?"}], **fields}, ServeLimits())


def test_model_defaults_fill_only_what_the_request_left_out():
    r1 = {"temperature": 0.6, "top_p": 0.95}
    sampling = _request().for_model(r1, prompt_tokens=10, context=2048, limits=ServeLimits(), reasoning=True)
    assert (sampling.temperature, sampling.top_p) == (0.6, 0.95)
    assert sampling.max_new_tokens == 2048 - 10  # the reasoning default (4096) within what the context leaves
    mine = _request(temperature=0, top_p=0.5, max_tokens=7).for_model(r1, prompt_tokens=10, context=2048,
                                                                       limits=ServeLimits())
    assert (mine.temperature, mine.top_p, mine.max_new_tokens) == (0.0, 0.5, 7)
    plain = _request().for_model({}, prompt_tokens=10, context=2048, limits=ServeLimits())
    assert (plain.temperature, plain.top_p, plain.max_new_tokens) == (1.0, 1.0, ServeLimits().default_max_tokens)


def test_max_tokens_goes_up_to_the_context_and_no_further():
    limits = ServeLimits()
    assert limits.max_tokens == 32768  # no fixed 1024 cap: the model's context decides
    ok = _request(max_tokens=2000).for_model({}, prompt_tokens=48, context=2048, limits=limits)
    assert ok.max_new_tokens == 2000
    with pytest.raises(RequestRefused) as refused:
        _request(max_tokens=2001).for_model({}, prompt_tokens=48, context=2048, limits=limits)
    assert refused.value.code == "context_length_exceeded" and "at most 2000" in refused.value.message
    with pytest.raises(RequestRefused, match="must be an integer from 1 to 64"):
        parse_chat_request({"messages": [{"role": "user", "content": "?"}], "max_tokens": 65},
                           ServeLimits(max_tokens=64, default_max_tokens=64))
    with pytest.raises(RequestRefused) as full:
        _request().for_model({}, prompt_tokens=2048, context=2048, limits=limits)
    assert full.value.code == "context_length_exceeded"


def test_sampling_defaults_come_from_generation_config_as_written(tmp_path):
    from appliance.serve.models import sampling_defaults

    assert sampling_defaults(TINY) == {}  # the tiny model's file sets neither: the API defaults stay
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "eos_token_id": 1}))
    assert sampling_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.95}
    (tmp_path / "generation_config.json").write_text("{not json")
    assert sampling_defaults(tmp_path) == {}


def test_openai_client_gets_reasoning_content_streamed_and_not(server, appliance):
    openai = pytest.importorskip("openai", reason="the `openai` package is not installed in this venv")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=appliance.keys["client"])
    request = {"model": "qa", "messages": [{"role": "user", "content": "Why does pump P4 cavitate?"}],
               "max_tokens": 12, "temperature": 0}
    chat = client.chat.completions.create(**request)
    message = chat.choices[0].message
    # Greedy decoding of the tiny model never writes </think> within 12 tokens: all of it is reasoning.
    assert message.reasoning_content and message.content == ""
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 12
    assert chat.usage.completion_tokens_details.reasoning_tokens == 12
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(**request, stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
    assert (reasoning, content) == (message.reasoning_content, message.content)
    completion = client.completions.create(model="qa", prompt="Pump P4:", max_tokens=4, temperature=0)
    assert not hasattr(completion.choices[0], "reasoning_content") or \
        completion.choices[0].reasoning_content is None  # /v1/completions: raw text, unchanged
    listed = {m.id: m for m in client.models.list()}
    assert listed["qa"].max_model_len == 2048 and listed["qa"].airlock["reasoning"] is True
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(**{**request, "max_tokens": 2047})


class _Replay:
    """A backend that replays known token ids (the model's part); everything after it is the real code."""

    kind = "replay"

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def generate(self, prompt_ids, sampling, should_stop):
        yield from self.ids[:sampling.max_new_tokens]


@pytest.mark.parametrize(("max_new", "finish", "reasoning", "content", "thinking"), [
    (64, "stop", "Valve V3 sticks.", "Clean valve V3.", 11),  # closed, then EOS
    (6, "length", "Valve V3 s", "", 6),                         # cut inside the thinking: all reasoning
])
def test_complete_splits_a_known_generation(tokenizer, max_new, finish, reasoning, content, thinking):
    from appliance.serve.backends import Sampling
    from appliance.serve.decoding import complete

    ids = tokenizer("Valve V3 sticks.\n</think>\n\nClean valve V3.", add_special_tokens=False)["input_ids"]
    close = ids.index(tokenizer.convert_tokens_to_ids("</think>"))
    assert close == 11  # the tiny tokenizer spells the thinking in 11 tokens: reasoning_tokens below
    streamed = {"reasoning": "", "content": ""}
    result = complete(_Replay([*ids, tokenizer.eos_token_id]), tokenizer, [0], Sampling(max_new_tokens=max_new),
                      stops=(), eos_ids=frozenset({tokenizer.eos_token_id}), should_stop=lambda: False,
                      reasoning=True, on_text=lambda t: streamed.__setitem__("content", streamed["content"] + t),
                      on_reasoning=lambda t: streamed.__setitem__("reasoning", streamed["reasoning"] + t))
    assert (result.reasoning, result.text, result.finish_reason) == (reasoning, content, finish)
    assert streamed == {"reasoning": reasoning, "content": content}
    assert result.reasoning_tokens == min(thinking, max_new)
