"""TensorRT serving limits without TensorRT: the profile arithmetic (what an engine holds vs what `airlock serve`
admits, checked at start-up) on the real tiny model's config, and one execution context per worker thread."""

from __future__ import annotations

import json
import threading

import pytest

from appliance.optimize.errors import EngineError
from appliance.optimize.tensorrt_engine import (
    SERVE_MAX_NEW_TOKENS,
    SERVE_MAX_PROMPT_TOKENS,
    ContextPool,
    admitted_lengths,
    causal_lm_profiles,
    check_lm_profile,
    lm_profile_capacity,
    serve_profile_limits,
)
from appliance.serve.limits import ServeLimits
from tests.conftest import REPO


@pytest.fixture(scope="module")
def config():
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(REPO / "models" / "tiny-deepseek-r1", local_files_only=True)


def _fits(profile, prompt: int, new: int) -> bool:
    """Every call RunnerLMBackend makes for this request (prefill of `prompt`, then one token on a growing past)
    lies within the profile's max shapes: the ground truth the capacity arithmetic must agree with."""
    high = {name: shapes[2] for name, shapes in profile.items()}
    calls = [(prompt, 0)] + [(1, prompt + k - 1) for k in range(1, new)]
    pasts = [shape[2] for name, shape in high.items() if name.startswith("past_")]
    return all(ids <= high["input_ids"][1] and ids <= high["position_ids"][1] and past <= min(pasts)
               and past + ids <= high["attention_mask"][1] for ids, past in calls)


def test_the_defaults_match_the_servers():
    limits = ServeLimits()
    assert (limits.max_prompt_tokens, limits.max_tokens) == (SERVE_MAX_PROMPT_TOKENS, SERVE_MAX_NEW_TOKENS)


@pytest.mark.parametrize(("sizes", "prompt", "total"), [
    ({"max_sequence": 512, "max_past": 2048}, 512, 2050),   # the old defaults
    ({"max_sequence": 32, "max_past": 64}, 32, 66),
    ({"max_sequence": 2047, "max_past": 2046}, 2047, 2048),  # derived from the tiny model and the serve defaults
])
def test_capacity_is_exactly_what_the_decode_calls_fit(config, sizes, prompt, total):
    profiles = causal_lm_profiles(config, **sizes)
    assert lm_profile_capacity(profiles) == (prompt, total)
    assert _fits(profiles[0], prompt, total - prompt)
    assert not _fits(profiles[0], prompt, total - prompt + 1)  # one more token would fail mid-generation
    assert not _fits(profiles[0], prompt + 1, 1)
    recorded = json.loads(json.dumps([{n: [list(s) for s in shapes] for n, shapes in profiles[0].items()}]))
    assert lm_profile_capacity(recorded) == (prompt, total)  # as the engine's sidecar stores them


def test_profiles_derived_from_the_serve_limits_hold_every_admitted_request(config):
    context = config.max_position_embeddings
    sizes = serve_profile_limits(context)
    assert sizes == {"max_sequence": 2047, "max_past": 2046}
    profiles = causal_lm_profiles(config, **sizes)
    check_lm_profile(profiles, context=context, max_prompt_tokens=SERVE_MAX_PROMPT_TOKENS,
                     max_new_tokens=SERVE_MAX_NEW_TOKENS)
    prompt, total = admitted_lengths(context, max_prompt_tokens=SERVE_MAX_PROMPT_TOKENS,
                                     max_new_tokens=SERVE_MAX_NEW_TOKENS)
    assert _fits(profiles[0], prompt, total - prompt) and _fits(profiles[0], 1, total - 1)
    # A 1.5B distill's context (131072) with the serve defaults: prompts of 4096, 36864 tokens in all.
    assert serve_profile_limits(131072) == {"max_sequence": 4096, "max_past": 36862}


def test_an_engine_smaller_than_the_limits_is_refused_with_the_sizes_that_would_work(config):
    profiles = causal_lm_profiles(config, max_sequence=512, max_past=2048)
    with pytest.raises(EngineError) as refused:
        check_lm_profile(profiles, context=2048, max_prompt_tokens=4096, max_new_tokens=32768, run_id="lm-1")
    assert "prompts of up to 512 tokens" in refused.value.message and "admits prompts of 2047" in refused.value.message
    assert "--max-prompt-tokens 512 --max-tokens 1538" in refused.value.hint
    assert "airlock engine build lm-1 --max-sequence 2047 --max-past 2046" in refused.value.hint
    # The limits the hint names are accepted by the same engine, and hold exactly.
    check_lm_profile(profiles, context=2048, max_prompt_tokens=512, max_new_tokens=1538)
    with pytest.raises(EngineError):
        check_lm_profile(profiles, context=4096, max_prompt_tokens=512, max_new_tokens=1539)


def test_each_context_serves_one_caller_at_a_time_and_callers_beyond_the_contexts_wait():
    """The runner's pool of execution contexts (TensorRT's: one inference per context, one profile copy per
    context), with real threads: slot i is made once, by factory(i); never two callers on one slot; a third caller
    waits while both are out, and gets the slot the first gives back."""
    made: list[int] = []
    pool = ContextPool(lambda slot: (made.append(slot), f"context-{slot}")[1], slots=2)
    both_out, release = threading.Barrier(3), threading.Event()
    held: list[str] = []

    def hold() -> None:
        with pool.checkout() as context:
            held.append(context)
            both_out.wait()
            release.wait()

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for thread in holders:
        thread.start()
    both_out.wait()  # both slots are out now, each to one holder
    assert sorted(held) == ["context-0", "context-1"] and sorted(made) == [0, 1]
    third: list[str] = []
    def wait_for_one() -> None:
        with pool.checkout() as context:
            third.append(context)

    waiter = threading.Thread(target=wait_for_one)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and third == []  # no free context: it waits (it cannot get one while both are out)
    release.set()
    for thread in holders:
        thread.join()
    waiter.join()
    assert third[0] in ("context-0", "context-1") and pool.made == 2 and sorted(made) == [0, 1]


def test_contexts_are_never_shared_under_load():
    pool = ContextPool(lambda slot: {"slot": slot, "users": 0}, slots=2)
    overlaps, most = [], [0]
    lock = threading.Lock()
    active = [0]

    def worker() -> None:
        for _ in range(200):
            with pool.checkout() as context:
                context["users"] += 1
                with lock:
                    active[0] += 1
                    most[0] = max(most[0], active[0])
                if context["users"] != 1:
                    overlaps.append(context["slot"])
                context["users"] -= 1
                with lock:
                    active[0] -= 1

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == [] and most[0] <= 2 and pool.made <= 2


def test_the_batch_rows_of_a_profile_are_checked_against_max_batch(config):
    """--max-batch decides how many requests share one call where the backend batches; an engine whose profile
    holds fewer rows is refused at start-up with both numbers and the two ways out."""
    from appliance.optimize.tensorrt_engine import lm_profile_rows
    from appliance.serve.limits import lm_rows_per_call

    limits = ServeLimits()
    # Batched backends carry max_batch rows per call; TensorRT (not batched by the server) and --max-batch 1 one.
    assert (lm_rows_per_call(limits, "ort-cpu"), lm_rows_per_call(limits, "pytorch")) == (32, 32)
    assert lm_rows_per_call(limits, "tensorrt") == lm_rows_per_call(ServeLimits(max_batch=1), "ort-cpu") == 1

    context = config.max_position_embeddings
    small = causal_lm_profiles(config, **serve_profile_limits(context))  # the build's default: 4 rows
    assert lm_profile_rows(small) == 4
    check_lm_profile(small, context=context, max_prompt_tokens=SERVE_MAX_PROMPT_TOKENS,
                     max_new_tokens=SERVE_MAX_NEW_TOKENS, rows=lm_rows_per_call(limits, "tensorrt"))
    with pytest.raises(EngineError) as refused:
        check_lm_profile(small, context=context, max_prompt_tokens=SERVE_MAX_PROMPT_TOKENS,
                         max_new_tokens=SERVE_MAX_NEW_TOKENS, run_id="lm-1", rows=32, max_batch=32)
    assert refused.value.message == ("the TensorRT engine decodes at most 4 request(s) per call, but this server "
                                     "batches 32 (--max-batch 32)")
    assert refused.value.hint == "serve with --max-batch 4, or rebuild the engine: `airlock engine build lm-1 " \
                                 "--max-batch 32`"
    assert "\n" not in refused.value.message + refused.value.hint

    # Derived with the rows: every input's max batch is 32, and the same lengths as without.
    sizes = serve_profile_limits(context, rows=32)
    assert sizes == {"max_sequence": 2047, "max_past": 2046, "max_batch": 32}
    wide = causal_lm_profiles(config, **sizes)
    assert lm_profile_rows(wide) == 32 and {shapes[2][0] for shapes in wide[0].values()} == {32}
    assert lm_profile_capacity(wide) == lm_profile_capacity(small)
    check_lm_profile(wide, context=context, max_prompt_tokens=SERVE_MAX_PROMPT_TOKENS,
                     max_new_tokens=SERVE_MAX_NEW_TOKENS, rows=32, max_batch=32)
    recorded = json.loads(json.dumps([{n: [list(s) for s in shapes] for n, shapes in wide[0].items()}]))
    assert lm_profile_rows(recorded) == 32  # as the engine's sidecar stores them
