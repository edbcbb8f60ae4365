"""The transformers engine: the same log-prob semantics as vLLM (raw = forward pass at temperature 1,
processed = the sampling distribution), grouping, finish reasons, weight updates, errors."""

import pytest
import torch
from float64_checks import check_sample_log_probs

from rollout.engine import resolve_model_path
from rollout.hf_engine import HFEngine, process_logits
from rollout.reference import load_reference_model, perturbed_state_dict
from rollout.tiny import EOS_TOKEN_ID, build_tiny_model
from rollout.types import SamplingConfig
from rollout.worker import RolloutWorker

PROMPTS = [[{"role": "user", "content": "What is 2 + 3?"}], [257, 117, 115, 101, 114, 10, 104, 105]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("rollout_hf") / "model")


@pytest.fixture(scope="module")
def reference(model_dir):
    return load_reference_model(model_dir)


def test_raw_log_probs_match_forward_pass_even_at_other_temperatures(model_dir, reference):
    engine = HFEngine(model_dir, max_model_len=128)
    samples = engine.generate(PROMPTS, SamplingConfig(n=3, max_tokens=16, seed=0, temperature=0.7, top_k=50))
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1]
    check_sample_log_probs(reference, samples)
    again = engine.generate(PROMPTS, SamplingConfig(n=3, max_tokens=16, seed=0, temperature=0.7, top_k=50))
    assert [s.response_ids for s in samples] == [s.response_ids for s in again]  # seeded


def test_processed_log_probs_are_the_sampling_distribution(model_dir, reference):
    engine = HFEngine(model_dir, logprobs_mode="processed_logprobs")
    sampling = SamplingConfig(n=2, max_tokens=12, seed=1, temperature=0.5)
    samples = engine.generate(PROMPTS, sampling)
    check_sample_log_probs(reference, samples, temperature=0.5)  # temperature only: the forward with logits / T
    # With top_k, masked tokens renormalise: every processed log-prob is >= the temperature-only one.
    topk = engine.generate(PROMPTS, SamplingConfig(n=2, max_tokens=12, seed=1, temperature=0.5, top_k=5))
    check_sample_log_probs(reference, topk, temperature=0.5, at_least=True)


def test_process_logits_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top_p = process_logits(logits, SamplingConfig(top_p=0.8))  # 0.5 + 0.3 reaches 0.8: keep two
    assert torch.isfinite(top_p).tolist() == [[True, True, False, False]]
    top_p = process_logits(logits, SamplingConfig(top_p=0.81))
    assert torch.isfinite(top_p).tolist() == [[True, True, True, False]]
    top_k = process_logits(logits, SamplingConfig(top_k=1, temperature=2.0))
    assert torch.isfinite(top_k).tolist() == [[True, False, False, False]]
    assert top_k[0, 0].item() == pytest.approx(torch.log(torch.tensor(0.5)).item() / 2)


def test_finish_reasons_and_stop_strings(model_dir):
    engine = HFEngine(model_dir)
    samples = engine.generate(PROMPTS, SamplingConfig(n=4, max_tokens=4, seed=3))
    assert all(s.finish_reason == "length" or s.response_ids[-1] == EOS_TOKEN_ID for s in samples)
    letters = tuple("abcdefghijklmnopqrstuvwxyz")
    stopped = engine.generate(PROMPTS, SamplingConfig(n=4, max_tokens=80, seed=3, stop=letters))
    cut = [s for s in stopped if s.finish_reason == "stop" and s.response_ids[-1] != EOS_TOKEN_ID]
    assert len(cut) >= 5
    for s in cut:
        assert engine.tokenizer.decode(s.response_ids[-1:]) in letters
        assert s.text == engine.tokenizer.decode(s.response_ids[:-1], skip_special_tokens=True)


def test_worker_weight_update_streams_buckets_and_stamps_version(model_dir):
    worker = RolloutWorker(model_dir, engine="hf")
    new_state = perturbed_state_dict(model_dir, seed=4)
    stats = worker.update_weights(new_state.items(), policy_version=3)
    assert stats["bytes"] == sum(t.numel() * 4 for t in new_state.values()) and stats["num_buckets"] == 1
    samples = worker.generate(PROMPTS, SamplingConfig(n=2, max_tokens=8, seed=0), prompt_index_offset=10)
    assert [s.prompt_index for s in samples] == [10, 10, 11, 11]
    assert all(s.policy_version == 3 for s in samples)
    check_sample_log_probs(load_reference_model(model_dir, new_state), samples)
    with pytest.raises(KeyError, match="no_such.weight"):
        worker.update_weights([("no_such.weight", torch.zeros(2))], policy_version=4)
    assert worker.info()["policy_version"] == 3  # a failed update does not bump the version


def test_errors_are_clear(model_dir, tmp_path):
    engine = HFEngine(model_dir, max_model_len=64)
    with pytest.raises(ValueError, match=r"prompt 6 is too long: 60 prompt tokens \+ max_tokens 8 = 68 > .*64"):
        engine.generate([[257] * 3, [257] * 60], SamplingConfig(max_tokens=8), prompt_index_offset=5)
    with pytest.raises(ValueError, match="empty batch"):
        engine.generate([], SamplingConfig())
    with pytest.raises(FileNotFoundError, match="nowhere/model"):
        HFEngine(tmp_path / "nowhere" / "model")
    with pytest.raises(FileNotFoundError, match="'org/model'"):
        resolve_model_path("org/model")  # looks like a hub id, but HF_HUB_OFFLINE=1 in tests
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0.0)
