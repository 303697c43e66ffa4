"""Continuous batching of an onnxruntime-genai export (appliance.serve.genai_backend.GenAILMBackend.forward_batch
under appliance.serve.batching.BatchingLMBackend): the real builder's int4 export of models/tiny-deepseek-r1, the
real og.Generator and ONNX Runtime, the scheduler's real threads.

One module fixture builds the export once (the builder in a child process: the test is slow-marked for it); a
decoder that cannot load and the right-padded cache bookkeeping are checked without it (milliseconds).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.serve.backends import Sampling, make_generator
from appliance.serve.batching import _Batch, _Request, _Row, _with_new_column
from tests.conftest import REPO

TINY = REPO / "models" / "tiny-deepseek-r1"
JOIN_S = 120
"""How long a test waits for a request thread (a hung scheduler fails the test instead of hanging the suite); a
request here takes well under a second of CPU."""


@pytest.fixture(scope="module")
def genai_int4(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from appliance.optimize.genai_export import build_genai_model
    from appliance.optimize.recipe import QuantRecipe

    work = tmp_path_factory.mktemp("genai-batch")
    model = AutoModelForCausalLM.from_pretrained(TINY, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(TINY, local_files_only=True)
    # The committed base model as the builder's checkpoint (no LoRA: serving does not care where weights came from).
    export = build_genai_model(model, tokenizer, work, variant="genai-int4", recipe=QuantRecipe(), checkpoint=TINY)
    return export.path


def _served(folder: Path, max_batch: int) -> tuple[Any, Any]:
    """(the genai backend, what the server holds for it: RunnerLMBackend under BatchingLMBackend), as models.py
    builds them."""
    from appliance.serve.backends import RunnerLMBackend
    from appliance.serve.batching import BatchingLMBackend, batchable
    from appliance.serve.genai_backend import GenAILMBackend

    backend = GenAILMBackend.load(folder, variant="genai-int4")  # og.Generator alone: the reference
    # What a batching CPU server loads: the batch session alone, no og.Model (the weights in memory once).
    served = GenAILMBackend.load(folder, variant="genai-int4", batched_only=True)
    assert served.model is None and served.session is not None
    with pytest.raises(RuntimeError, match="loaded for batched serving only"):
        next(served.generate([5, 6], Sampling(max_new_tokens=1, temperature=0.0), lambda: False))
    runner = RunnerLMBackend(served, (6, 2, 48))
    assert batchable(runner) and runner.kind == "genai-cpu" and runner.cache_padding == "right"
    batched = BatchingLMBackend(runner, max_batch)
    assert batched.slotted  # the batch's KV cache stays in the backend's KVSlots, written in place
    return backend, batched


def _in_threads(batched: Any, jobs: list[tuple[list[int], Sampling, Any]]) -> list[list[int] | BaseException]:
    results: list[list[int] | BaseException] = [[] for _ in jobs]
    # Every request is handed to the scheduler at the same moment: started one by one, an early short request could
    # finish before a late thread (slow to be scheduled on a loaded machine) submits, and rows would share no step.
    together = threading.Barrier(len(jobs))

    def consume(i: int) -> None:
        prompt, sampling, stop = jobs[i]
        together.wait(JOIN_S)
        try:
            results[i] = list(batched.generate(prompt, sampling, stop))
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_S)
        assert not thread.is_alive(), "a request never finished: the batch lost a row"
    return results


def _wait_idle(batched: Any) -> None:
    deadline = time.monotonic() + JOIN_S
    while (batched._thread is not None or batched.rows) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batched._thread is None and batched.rows == 0 and batched.waiting == 0


@pytest.mark.slow  # the builder run: 11 s of setup to 128 s beside other work (2 cores); the test itself 0.3-3 s
def test_concurrent_greedy_requests_get_their_tokens_alone_and_a_cancelled_one_frees_its_row(genai_int4):
    from appliance.serve.limits import ServeLimits, lm_rows_per_call

    backend, batched = _served(genai_int4, max_batch=3)
    # Five prompts of 3..27 tokens, each with its own length of answer: with 3 rows, two wait and join at token
    # boundaries while the others run, and rows leave at different steps.
    prompts = [[5] + [(11 * i + 7 * j) % 900 + 10 for j in range(2 + 6 * i)] for i in range(5)]
    lengths = [9, 4, 12, 6, 10]
    greedy = [Sampling(max_new_tokens=n, temperature=0.0) for n in lengths]
    alone = [list(backend.generate(p, s, lambda: False)) for p, s in zip(prompts, greedy, strict=True)]
    assert [len(tokens) for tokens in alone] == lengths  # og.Generator alone (the unbatched path)
    together = _in_threads(batched, [(p, s, lambda: False) for p, s in zip(prompts, greedy, strict=True)])
    assert together == alone
    assert batched.steps > 0 and batched.rows_decoded / batched.steps > 1.5  # rows really shared forward passes
    assert batched.rows_decoded + len(prompts) == sum(lengths)  # each prompt's first token comes from its prefill

    # A request whose client went away (should_stop, as a closed connection) leaves its only row: the next one runs.
    single = type(batched)(batched.inner, 1)
    gone = threading.Event()
    produced: list[int] = []

    def leaving() -> bool:
        return gone.is_set()

    def long_request() -> None:
        for token in single.generate(prompts[4], Sampling(max_new_tokens=1000, temperature=0.0), leaving):
            produced.append(token)
            if len(produced) == 3:
                gone.set()

    first = threading.Thread(target=long_request)
    first.start()
    first.join(JOIN_S)
    # It ends at the scheduler's next token boundary after the stop (a few tokens may be in flight), not at 1000.
    assert not first.is_alive() and 3 <= len(produced) < 1000
    after = _in_threads(single, [(prompts[1], greedy[1], lambda: False)])
    assert after == [alone[1]]
    _wait_idle(single)  # the scheduler thread ends once no row is left (the last token is handed over first)
    # A consumer that stops iterating (EOS seen above) frees its row too.
    stream = single.generate(prompts[2], greedy[2], lambda: False)
    assert next(stream) == alone[2][0]
    stream.close()
    assert _in_threads(single, [(prompts[3], greedy[3], lambda: False)]) == [alone[3]]

    # Seeded sampling is reproducible through the batch, whatever else runs beside it.
    seeded = Sampling(max_new_tokens=8, temperature=0.8, top_p=0.95, seed=7)
    twice = _in_threads(batched, [(prompts[2], seeded, lambda: False), (prompts[0], greedy[0], lambda: False),
                                  (prompts[2], seeded, lambda: False)])
    assert twice[0] == twice[2] and len(twice[0]) == 8 and twice[1] == alone[0]
    # Admission: a batched genai model takes rows of the batch, as the other batched backends.
    assert lm_rows_per_call(ServeLimits(max_batch=32), "genai-cpu") == 32
    assert lm_rows_per_call(ServeLimits(max_batch=32), "genai-cuda") == 1


@pytest.mark.slow  # shares the module's export; the test itself 1-4 s (a 2047-token prefill)
def test_rows_join_and_leave_the_in_place_cache_and_a_row_past_the_context_fails_alone(genai_int4):
    import numpy as np

    from appliance.serve.genai_backend import KVSlots

    backend, batched = _served(genai_int4, max_batch=4)
    greedy = Sampling(max_new_tokens=14, temperature=0.0)
    # 250 tokens: the row crosses the cache's first width (KVSlots.START_WIDTH) mid-run, so the buffers grow (one
    # copy) while the other rows decode.
    prompts = {"a": [5, 17, 230], "b": [5, *((7 * j) % 900 + 10 for j in range(249))], "c": [5, *range(40, 51)]}
    alone = {name: list(backend.generate(p, greedy, lambda: False)) for name, p in prompts.items()}
    assert KVSlots.START_WIDTH < len(prompts["b"]) + greedy.max_new_tokens

    kv = backend.kv_slots()
    slot_of = {"a": 0, "b": 1}
    got = {name: [int(kv.prefill(slot, prompts[name])[0].argmax())] for name, slot in slot_of.items()}
    width = kv.width
    for step in range(13):
        if step == 3:  # c joins mid-run, prefilled into the next free slot
            slot_of["c"] = 2
            got["c"] = [int(kv.prefill(2, prompts["c"])[0].argmax())]
        if step == 6:  # a leaves: the last row (c) takes its slot, only c's cached columns are copied
            kv.move(2, 0)
            kv.release(2)
            slot_of = {"b": 1, "c": 0}
        order = sorted(slot_of, key=slot_of.get)  # slots 0..n-1 in use
        logits = kv.decode([got[name][-1] for name in order])
        for row, name in enumerate(order):
            got[name].append(int(np.argmax(logits[row])))
    assert kv.width > width  # it grew mid-run
    assert got["a"] == alone["a"][:len(got["a"])] and len(got["a"]) == 7
    assert got["b"] == alone["b"] and got["c"] == alone["c"][:len(got["c"])] and len(got["c"]) == 11

    # Through the scheduler: a row that needs more than the model's context fails alone, with one line; the rows
    # beside it (before and after it in the batch) get og.Generator's tokens.
    too_long = [5] * (backend.context_length - 1)
    results = _in_threads(batched, [(prompts["a"], greedy, lambda: False), (too_long, greedy, lambda: False),
                                    (prompts["c"], greedy, lambda: False)])
    assert results[0] == alone["a"] and results[2] == alone["c"]
    assert isinstance(results[1], ValueError) and "beyond the model's context" in str(results[1])
    _wait_idle(batched)

    # The adapter hook: `extra_inputs` are fed on every run of the batch session (an input the graph does not have
    # is ONNX Runtime's error, so it really is bound).
    backend.extra_inputs = {"not_a_graph_input": np.zeros(1, dtype=np.float32)}
    with pytest.raises(Exception, match="not_a_graph_input"):
        backend.kv_slots().prefill(0, prompts["a"])
    with pytest.raises(Exception, match="not_a_graph_input"):
        backend.forward_batch(*_prefill_feeds(prompts["a"]), None)


def _prefill_feeds(ids: list[int]) -> tuple[Any, Any, Any]:
    import torch

    return (torch.tensor([ids], dtype=torch.int64), torch.ones(1, len(ids), dtype=torch.int64),
            torch.arange(len(ids), dtype=torch.int64)[None])


def test_a_decoder_batching_cannot_load_is_one_line_with_a_hint(tmp_path):
    from appliance.optimize.errors import EngineError
    from appliance.serve.genai_backend import batch_session

    (tmp_path / "model.onnx").write_bytes(b"not an onnx graph")
    decoder = {"filename": "model.onnx", "num_hidden_layers": 6, "num_key_value_heads": 2, "head_size": 48}
    with pytest.raises(EngineError, match="cannot load the genai export for batching") as caught:
        batch_session(tmp_path, decoder)
    assert "\n" not in caught.value.message and "--max-batch 1" in caught.value.hint


def _row(name: int, length: int) -> tuple[_Row, list, Any]:
    import torch

    request = _Request([name], Sampling(max_new_tokens=1), lambda: False, make_generator(0))
    past = [torch.full((1, 2, length, 3), float(name * 100 + t), dtype=torch.float32) for t in range(4)]
    return _Row(request, length, name), past, torch.ones(1, length, dtype=torch.int64)


def test_right_padded_rows_keep_their_tokens_first_and_trim_at_the_end():
    batch = _Batch(right=True)
    lengths = {1: 5, 2: 30, 3: 9}
    batch.add([([r], p, m) for r, p, m in (_row(n, lengths[n]) for n in (1, 2, 3))])

    def check(expected: dict[int, int]) -> None:
        width = batch.mask.shape[1]
        for i, row in enumerate(batch.rows):
            length = expected[row.token]
            assert batch.mask[i].tolist() == [1] * length + [0] * (width - length)
            for t, tensor in enumerate(batch.past):
                assert bool((tensor[i, :, :length] == row.token * 100 + t).all())
                assert bool((tensor[i, :, length:] == 0).all())

    check(lengths)
    # The next token's column: each row's own length (GroupQueryAttention writes it there), not the last column.
    wider = _with_new_column(batch.mask, right=True)
    assert wider.shape[1] == 31 and wider.sum(1).tolist() == [6, 31, 10]
    assert wider[0].tolist() == [1] * 6 + [0] * 25
    # The 30-token row leaves: 21 unused columns at the end (>= 30 / 8 and >= 8) are dropped.
    batch.keep([0, 2])
    assert batch.mask.shape[1] == 9
    check({1: 5, 3: 9})
    alone = batch.split()  # 4 unused columns of row 1 stay (fewer than 8): a copy costs more than masking them
    assert [b.mask.shape[1] for b in alone] == [9, 9] and all(b.right for b in alone)
    assert alone[0].mask[0].tolist() == [1] * 5 + [0] * 4 and bool((alone[0].past[0][0, :, :5] == 100).all())


def test_the_batch_sampler_keeps_each_rows_rule_seed_and_failure():
    import math

    import torch

    from appliance.serve.genai_backend import BatchSampler

    sampler = BatchSampler()
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
    logits[1, 17] = 30.0  # far above the rest: with top_p 0.5 only token 17 is kept
    logits[3] = math.nan
    samplings = [Sampling(4, temperature=0.0), Sampling(4, temperature=1.0, top_p=0.5, seed=1),
                 Sampling(4, temperature=0.9, top_p=0.95, seed=2), Sampling(4, temperature=1.0, seed=3),
                 Sampling(4, temperature=0.7, seed=4)]

    def draw(rounds: int) -> list[list[int | Exception]]:
        generators = [sampler.generator(s.seed) for s in samplings]
        return [sampler.pick(logits, samplings, generators) for _ in range(rounds)]

    first, again = draw(50), draw(50)
    assert [[t for t in step if not isinstance(t, Exception)] for step in first] == \
        [[t for t in step if not isinstance(t, Exception)] for step in again]  # seeded: the same stream
    for step in first:
        assert step[0] == int(logits[0].argmax()) and step[1] == 17
        assert isinstance(step[3], ValueError) and "not finite" in str(step[3])  # that row alone fails
        assert all(0 <= step[i] < 40 for i in (2, 4))
    # Temperature 0.7 over 40 tokens of N(0, 1) logits: 50 draws see several tokens, not a constant.
    assert len({step[4] for step in first}) >= 5
    # A row's tokens do not depend on the rows beside it: row 2 alone draws what it drew in the batch.
    alone = sampler.generator(2)
    assert [sampler.pick(logits[2:3], samplings[2:3], [alone])[0] for _ in range(50)] == [s[2] for s in first]
