"""The vLLM engine (CPU build, in-process): log-probs against a transformers forward pass, grouping, finish
reasons, stop strings, weight updates and errors. One engine start for the whole module."""

import pytest
import torch
from float64_checks import check_sample_log_probs

from rollout.reference import load_reference_model, perturbed_state_dict
from rollout.tiny import EOS_TOKEN_ID, build_tiny_model
from rollout.types import SamplingConfig, samples_to_batch

pytestmark = pytest.mark.vllm

MAX_MODEL_LEN = 256
PROMPTS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [257, 117, 115, 101, 114, 10, 104, 105],  # token ids, used as given
    [{"role": "system", "content": "Think step by step."}, {"role": "user", "content": "Solve x^2 = 4."}],
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("rollout_vllm") / "model")


@pytest.fixture(scope="module")
def engine(model_dir):
    from rollout.engine import VLLMEngine

    engine = VLLMEngine(model_dir, dtype="float32", max_model_len=MAX_MODEL_LEN, seed=0)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def reference(model_dir):
    return load_reference_model(model_dir)


def test_log_probs_match_transformers_forward_and_groups_are_in_prompt_order(engine, reference):
    from transformers import AutoTokenizer

    n = 4
    samples = engine.generate(PROMPTS, SamplingConfig(n=n, max_tokens=24, seed=7))
    assert len(samples) == len(PROMPTS) * n
    assert [s.prompt_index for s in samples] == [p for p in range(len(PROMPTS)) for _ in range(n)]
    tok = AutoTokenizer.from_pretrained(engine.model_path)
    chat = tok.apply_chat_template(PROMPTS[0], tokenize=False, add_generation_prompt=True)
    assert samples[0].prompt_ids == tuple(tok.encode(chat, add_special_tokens=False))
    assert samples[n].prompt_ids == tuple(PROMPTS[1])
    assert all(s.policy_version == 0 and s.log_probs.dtype == torch.float32 for s in samples)
    assert len({s.response_ids for s in samples[:n]}) == n  # n distinct samples of one prompt
    check_sample_log_probs(reference, samples)

    batch = samples_to_batch(samples, engine.pad_token_id)
    assert batch.group_index.tolist() == [s.prompt_index for s in samples]
    last = samples[-1]
    row = batch.prompt_ids.shape[0] - 1
    assert batch.prompt_ids[row, batch.prompt_mask[row]].tolist() == list(last.prompt_ids)
    assert batch.prompt_mask[row, -1] and batch.response_mask[row, 0]  # left-padded prompt, right-padded response
    assert torch.equal(batch.rollout_log_probs[row, : len(last.response_ids)], last.log_probs)


def test_seeded_sampling_is_reproducible(engine):
    sampling = SamplingConfig(n=2, max_tokens=16, seed=3)
    first = engine.generate(PROMPTS[:2], sampling)
    again = engine.generate(PROMPTS[:2], sampling)
    assert [s.response_ids for s in first] == [s.response_ids for s in again]


def test_seeded_batch_bigger_than_one_prefill_step(engine):
    """Regression: on vLLM's CPU build a seeded request whose prefill is chunked kills the engine ("CPU
    Generator does not use offset"); the engine turns chunked prefill off on CPU."""
    prompts = [[257] + [97 + i % 26] * 199 for i in range(48)]  # 2 x 48 x 200 tokens > one step's budget
    samples = engine.generate(prompts, SamplingConfig(n=2, max_tokens=4, seed=0))
    assert [s.prompt_index for s in samples] == [p for p in range(48) for _ in range(2)]


def test_finish_reasons_stop_strings_and_stop_tokens(engine, tiny_tokenizer):
    length = engine.generate(PROMPTS, SamplingConfig(n=2, max_tokens=5, seed=1))
    for s in length:
        assert s.finish_reason == "length" or s.response_ids[-1] == EOS_TOKEN_ID
        assert len(s.response_ids) <= 5
    assert sum(s.finish_reason == "length" for s in length) >= 5

    # A random model: any lowercase letter is ~10% likely per token, so nearly every sample stops early.
    letters = tuple("abcdefghijklmnopqrstuvwxyz")
    stopped = engine.generate(PROMPTS, SamplingConfig(n=4, max_tokens=100, seed=2, stop=letters))
    n_stop = 0
    for s in stopped:
        if s.finish_reason != "stop" or s.response_ids[-1] == EOS_TOKEN_ID:
            continue
        n_stop += 1
        assert tiny_tokenizer.decode(s.response_ids[-1:]) in letters  # ends on the token completing the stop
        assert not any(c in letters for c in tiny_tokenizer.decode(s.response_ids[:-1]))
        assert s.text == tiny_tokenizer.decode(s.response_ids[:-1], skip_special_tokens=True)  # stop cut off
    assert n_stop >= 8

    stop_ids = tuple(range(97, 123))  # the same letters as token ids
    by_token = engine.generate(PROMPTS, SamplingConfig(n=4, max_tokens=100, seed=2, stop_token_ids=stop_ids))
    ends = [s.response_ids[-1] for s in by_token if s.finish_reason == "stop"]
    assert len(ends) >= 8 and all(t in stop_ids or t == EOS_TOKEN_ID for t in ends)


@pytest.fixture(scope="module")
def tiny_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_errors_are_clear(engine, model_dir, tmp_path):
    from rollout.engine import VLLMEngine

    too_long = [[257] * 10, [257] * (MAX_MODEL_LEN - 10)]
    with pytest.raises(ValueError, match=r"prompt 1 is too long: 246 prompt tokens \+ max_tokens 20"):
        engine.generate(too_long, SamplingConfig(max_tokens=20))
    with pytest.raises(ValueError, match="empty batch"):
        engine.generate([], SamplingConfig())
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        VLLMEngine(missing)
    narrow = build_tiny_model(tmp_path / "head16", num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="head_dim 16 is not supported"):
        VLLMEngine(narrow)


def test_weight_update_changes_outputs_and_matches_new_weights(engine, model_dir):
    """Runs last: it leaves the engine on perturbed weights. vLLM's reload warns "RotaryEmbedding: Failed to
    load weights" on every push (its cos/sin cache is no checkpoint weight); our filter drops exactly that, and
    the log-prob checks below are the proof that the warning was harmless."""
    import logging

    from rollout.engine import PREFIX_CACHE_LOGGER, PREFIX_CACHE_RESET
    from rollout.weight_transfer import FAILED_TO_LOAD, RELOAD_LOGGER

    records = []
    capture = logging.Handler(logging.WARNING)
    capture.emit = records.append
    logging.getLogger(RELOAD_LOGGER).addHandler(capture)
    cache_records = []  # vLLM's INFO line after each prefix-cache reset: dropped (one per push otherwise)
    cache_capture = logging.Handler(logging.INFO)
    cache_capture.emit = cache_records.append
    cache_logger = logging.getLogger(PREFIX_CACHE_LOGGER)
    assert cache_logger.isEnabledFor(logging.INFO)
    cache_logger.addHandler(cache_capture)
    sampling = SamplingConfig(n=2, max_tokens=24, seed=11)
    before = engine.generate(PROMPTS, sampling)

    # Stream the update in buckets of single tensors: fused layers (qkv, gate_up) receive their parts in
    # different buckets.
    new_state = perturbed_state_dict(model_dir, seed=1)
    engine.begin_weight_update()
    for name, tensor in reversed(list(new_state.items())):
        engine.load_weight_bucket([(name, tensor)])
    engine.finish_weight_update(policy_version=1)
    assert engine.llm.get_weight_version() == "1"  # the policy version is vLLM's weight version too
    after = engine.generate(PROMPTS, sampling)
    assert all(s.policy_version == 1 for s in after)
    assert [s.response_ids for s in after] != [s.response_ids for s in before]
    check_sample_log_probs(load_reference_model(model_dir, new_state), after)

    # The one-call contract, a second time (also: the prefix cache must not serve stale KV of these prompts).
    newer_state = perturbed_state_dict(model_dir, seed=2)
    engine.update_weights(newer_state.items(), policy_version=2)
    assert engine.llm.get_weight_version() == "2"
    newer = engine.generate(PROMPTS, sampling)
    assert all(s.policy_version == 2 for s in newer)
    check_sample_log_probs(load_reference_model(model_dir, newer_state), newer)
    logging.getLogger(RELOAD_LOGGER).removeHandler(capture)
    cache_logger.info("another block-pool message")  # other INFO lines of that logger still pass
    cache_logger.removeHandler(cache_capture)
    assert [r.getMessage() for r in cache_records] == ["another block-pool message"]
    assert PREFIX_CACHE_RESET not in [r.msg for r in cache_records]
    assert not [r.getMessage() for r in records if r.msg == FAILED_TO_LOAD], "a layer missed its weights"
    # The filter is installed, names the rotary embedding, and still lets the warning through for other layers.
    (installed,) = [f for f in logging.getLogger(RELOAD_LOGGER).filters if hasattr(f, "layer_names")]
    assert any("Rotary" in name for name in installed.layer_names)
    assert not any(name in installed.layer_names for name in ("QKVParallelLinear", "VocabParallelEmbedding"))
    other = logging.LogRecord(RELOAD_LOGGER, logging.WARNING, __file__, 0, FAILED_TO_LOAD, ("QKVParallelLinear",), None)
    assert installed.filter(other)


@pytest.mark.slow
def test_an_update_that_fails_part_way_is_aborted_and_the_next_one_loads(engine, model_dir):
    """After test_weight_update_...: a push whose last bucket names a weight the model does not have fails in
    vLLM's update call; the update is aborted (vLLM 0.32 has no abort: our worker extension finishes the
    layer-wise reload), neither version moves, and the next full push loads every weight (log-probs equal a
    transformers forward with them)."""
    before = (engine.policy_version, engine.llm.get_weight_version())
    new_state = perturbed_state_dict(model_dir, seed=3)
    broken = [*new_state.items(), ("model.layers.0.self_attn.no_such_proj.weight", torch.zeros(4, 4))]
    with pytest.raises(Exception, match="no_such_proj"):
        engine.update_weights(broken, policy_version=3)
    assert (engine.policy_version, engine.llm.get_weight_version()) == before
    # the engine still generates (on a mix of old and new layers) until the push is redone
    mixed = engine.generate(PROMPTS, SamplingConfig(n=2, max_tokens=24, seed=12))
    assert len(mixed) == 2 * len(PROMPTS) and all(torch.isfinite(s.log_probs).all() for s in mixed)
    engine.update_weights(new_state.items(), policy_version=3)
    assert (engine.policy_version, engine.llm.get_weight_version()) == (3, "3")
    samples = engine.generate(PROMPTS, SamplingConfig(n=2, max_tokens=24, seed=12))
    assert all(s.policy_version == 3 for s in samples)
    check_sample_log_probs(load_reference_model(model_dir, new_state), samples)


def test_processed_logprobs_mode_reports_the_sampling_distribution(model_dir, reference):
    """vLLM's "processed_logprobs" = log_softmax(logits / T) (no top-k/top-p here), unlike the default raw mode."""
    from rollout.engine import VLLMEngine

    engine = VLLMEngine(model_dir, dtype="float32", max_model_len=128, logprobs_mode="processed_logprobs")
    try:
        samples = engine.generate(PROMPTS, SamplingConfig(n=2, max_tokens=16, seed=5, temperature=0.5))
    finally:
        engine.shutdown()
    check_sample_log_probs(reference, samples, temperature=0.5)


@pytest.mark.slow
def test_weight_update_with_tied_embeddings(tmp_path):
    """Qwen2.5's small models tie lm_head to embed_tokens: the update must not restore a stale lm_head."""
    from rollout.engine import VLLMEngine

    tied_dir = build_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    new_state = perturbed_state_dict(tied_dir, seed=5)
    new_state["lm_head.weight"] = new_state["model.embed_tokens.weight"]  # what a tied model's state dict holds
    engine = VLLMEngine(tied_dir, dtype="float32", max_model_len=128)
    try:
        engine.update_weights(new_state.items(), policy_version=1)
        samples = engine.generate(PROMPTS[1:2], SamplingConfig(n=2, max_tokens=16, seed=0))
    finally:
        engine.shutdown()
    check_sample_log_probs(load_reference_model(tied_dir, new_state), samples)
