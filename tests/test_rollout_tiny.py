"""The tiny test model: loads through the normal Hugging Face code, its tokenizer round-trips text exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollout.tiny import EOS_TOKEN_ID, IM_START_TOKEN_ID, PAD_TOKEN_ID, build_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_tokenizer_round_trips_text_one_token_per_byte(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = "Hello  world\n\n\tindented  line\r\nünïcödé 数学 🙂 x^2 + y_1 = {3}\\n  trailing  "
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.eos_token_id) == (PAD_TOKEN_ID, EOS_TOKEN_ID)
    assert tok.convert_tokens_to_ids("<|im_start|>") == IM_START_TOKEN_ID


def test_chat_template_renders_chatml(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 1 = ?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1 + 1 = ?<|im_end|>\n"
    assert text == expected + "<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == IM_START_TOKEN_ID and ids.count(EOS_TOKEN_ID) == 2
    assert tok.decode(ids) == text


def test_model_loads_and_build_is_deterministic_and_idempotent(tiny_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.dtype == torch.float32
    assert model.config.eos_token_id == EOS_TOKEN_ID and model.config.pad_token_id == PAD_TOKEN_ID
    logits = model(torch.tensor([[IM_START_TOKEN_ID, 104, 105]])).logits
    assert logits.shape == (1, 3, 259) and torch.isfinite(logits).all()

    weights_file = tiny_dir / "model.safetensors"
    mtime = weights_file.stat().st_mtime_ns
    assert build_tiny_model(tiny_dir) == tiny_dir and weights_file.stat().st_mtime_ns == mtime  # not rebuilt

    other = build_tiny_model(tmp_path / "same_seed")
    a, b = load_file(weights_file), load_file(other / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    rebuilt = build_tiny_model(tmp_path / "same_seed", seed=1)  # different arguments: rebuilt in place
    assert json.loads((rebuilt / "tiny_model_args.json").read_text())["seed"] == 1
    c = load_file(rebuilt / "model.safetensors")
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
