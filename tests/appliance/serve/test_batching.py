"""Continuous batching (appliance.serve.batching) on the real tiny model, in PyTorch and on ONNX Runtime.

Mixed-length prompts decoded in one batch give exactly the tokens each gives alone (greedy); requests
that leave, are cancelled or fail in the middle of a batch take nothing from the others; a prompt
that fails its prefill fails alone. The HTTP side (32 users on one key, the official client) is in
test_batched_serving.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from appliance.serve.backends import RunnerLMBackend, Sampling, TorchLMBackend
from appliance.serve.batching import BatchingLMBackend, batchable
from tests.conftest import REPO

TINY = REPO / "models" / "tiny-deepseek-r1"
# Lengths 1 to 23 and different max_new_tokens: rows join with different pads and leave at different steps.
PROMPTS = [([0, 17, 402, 9, 255, 31, 77, 8, 301, 45, 12], 12), ([0, 5], 7), ([0, 88, 140, 3, 600, 21, 9], 16),
           ([0, *range(40, 62)], 5), ([0], 10), ([0, 250, 251, 252, 253], 14)]


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, object]]:
    """The tiny base model (its own random weights; no training needed) in PyTorch and exported to FP32 ONNX.

    One intra-op thread: on a loaded 2-core machine two OpenMP threads on the main thread spin against other
    processes (measured: 10-30 s instead of 0.7 s for the references below); the server computes in threads."""
    import torch
    from transformers import AutoModelForCausalLM

    from appliance.optimize.onnx_export import export_causal_lm_onnx, kv_cache_layout
    from appliance.optimize.runners import OrtRunner, ort_session

    model = AutoModelForCausalLM.from_pretrained(TINY, local_files_only=True).eval()
    runner = OrtRunner(ort_session(export_causal_lm_onnx(model, variant="fp32")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {"pytorch": TorchLMBackend(model), "ort-cpu": RunnerLMBackend(runner, kv_cache_layout(model.config))}
    torch.set_num_threads(threads)


def _greedy(max_new_tokens: int) -> Sampling:
    return Sampling(max_new_tokens=max_new_tokens, temperature=0.0)


def _together(batched: BatchingLMBackend, requests: list[tuple[list[int], Sampling, object]]) -> list[object]:
    """Run the requests from threads of their own, all admitted in the same step: the first request's stop check
    (called by the scheduler before it admits anyone) waits until the others are queued behind it."""
    gate = threading.Event()
    results: list[object] = [None] * len(requests)

    def first_check() -> bool:
        assert gate.wait(60)
        return False

    def consume(i: int) -> None:
        prompt, sampling, how = requests[i]
        should_stop = how if callable(how) else (lambda: False)
        tokens = batched.generate(prompt, sampling, first_check if i == 0 else should_stop)
        got: list[int] = []
        try:
            for token in tokens:
                got.append(token)
                if isinstance(how, int) and len(got) == how:
                    tokens.close()  # the client leaves after `how` tokens
                    break
            results[i] = got
        except Exception as exc:
            results[i] = (got, exc)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(requests))]
    threads[0].start()
    deadline = time.monotonic() + 60
    while batched._thread is None or batched.waiting:  # the first request is taken up: its check is waiting
        assert time.monotonic() < deadline, "the first request was never taken up"
        time.sleep(0.005)
    for thread in threads[1:]:
        thread.start()
    while batched.waiting < len(requests) - 1:
        assert time.monotonic() < deadline, "the requests never queued"
        time.sleep(0.005)
    gate.set()
    for thread in threads:
        thread.join(120)
    return results


@pytest.mark.parametrize("kind", ["pytorch", "ort-cpu"])
def test_a_batch_of_mixed_length_prompts_decodes_what_each_prompt_decodes_alone(backends, kind):
    backend = backends[kind]
    assert batchable(backend) and backend.kind == kind
    alone = [list(backend.generate(prompt, _greedy(n), lambda: False)) for prompt, n in PROMPTS]
    assert [len(tokens) for tokens in alone] == [n for _, n in PROMPTS]
    batched = BatchingLMBackend(backend, max_batch=8)
    together = _together(batched, [(prompt, _greedy(n), None) for prompt, n in PROMPTS])
    assert together == alone  # exact tokens, row by row
    # They shared the forward passes: 6 rows in the first step, the longest request alone at the end.
    assert batched.steps == max(n for _, n in PROMPTS) - 1
    assert batched.rows_decoded == sum(n - 1 for _, n in PROMPTS)
    deadline = time.monotonic() + 30
    while batched._thread is not None:  # the scheduler thread ends with its last request
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_requests_that_leave_are_cancelled_or_fail_take_nothing_from_the_others(backends):
    backend = backends["pytorch"]
    reference = [list(backend.generate(prompt, _greedy(n), lambda: False)) for prompt, n in PROMPTS[:3]]
    checks = {"failing": 0, "cancelled": 0}

    def cancelled_after_some() -> bool:  # checked before its prefill and before each step after the first
        checks["cancelled"] += 1
        return checks["cancelled"] > 6

    def failing_check() -> bool:
        checks["failing"] += 1
        if checks["failing"] > 3:
            raise RuntimeError("the client's own check failed")
        return False

    batched = BatchingLMBackend(backend, max_batch=4)  # 7 requests, 4 rows: 3 wait and join as rows leave
    vocab = backend.model.get_input_embeddings().num_embeddings
    requests = [
        (PROMPTS[0][0], _greedy(PROMPTS[0][1]), None),       # served normally
        (PROMPTS[1][0], _greedy(100), 2),                     # the client leaves after 2 tokens
        (PROMPTS[2][0], _greedy(100), failing_check),         # its stop check raises after 3 calls
        ([0, vocab + 5], _greedy(5), None),                   # a token the model does not have: its prefill fails
        (PROMPTS[3][0], _greedy(100), cancelled_after_some),  # cancelled (the connection closed) mid-way
        (PROMPTS[1][0], _greedy(PROMPTS[1][1]), None),        # waits for a row, then served normally
        (PROMPTS[2][0], _greedy(PROMPTS[2][1]), None),        # the same
    ]
    results = _together(batched, requests)
    assert results[0] == reference[0]
    assert results[5] == reference[1] and results[6] == reference[2]
    assert len(results[1]) == 2 and results[1] == list(backend.generate(PROMPTS[1][0], _greedy(2), lambda: False))
    got, error = results[2]
    assert isinstance(error, RuntimeError) and "own check" in str(error) and len(got) >= 1
    got, error = results[3]
    assert got == [] and isinstance(error, IndexError)
    assert results[4] == list(backend.generate(PROMPTS[3][0], _greedy(7), lambda: False))
    assert len(results[4]) == 7  # stopped at its 7th check (prefill, 6 steps), not run to max_tokens
    deadline = time.monotonic() + 30
    while batched._thread is not None:
        assert time.monotonic() < deadline, "a row was never freed"
        time.sleep(0.01)
    assert batched.rows == 0 and batched.waiting == 0
