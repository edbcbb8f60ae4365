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


def test_tiny_models_of_two_seeds_in_one_folder_keep_their_own_weights(tmp_path):
    """The run's build (build_tiny_model_in, what model.tiny_dir holds): init seeds 0 and 1 get directories of their
    own, and building seed 1 leaves seed 0's model as it was. (Before, both shared one directory rebuilt in place:
    two warm-starts started at once with init seeds 0 and 1 loaded one model, and one trained from the other's.)"""
    from rollout.tiny import build_tiny_model_in

    parent = tmp_path / "tiny"
    zero = build_tiny_model_in(parent, seed=0)
    before = load_file(zero / "model.safetensors")
    one = build_tiny_model_in(parent, seed=1)
    assert zero != one and zero.parent == one.parent == parent
    assert (zero.name.startswith("seed0-"), one.name.startswith("seed1-")) == (True, True)
    after = load_file(zero / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # seed 0's weights untouched
    assert not torch.equal(
        before["model.embed_tokens.weight"], load_file(one / "model.safetensors")["model.embed_tokens.weight"]
    )
    assert json.loads((one / "tiny_model_args.json").read_text())["seed"] == 1
    assert build_tiny_model_in(parent, seed=0) == zero  # the same arguments: the same directory, reused
    assert sorted(p.name for p in parent.iterdir()) == sorted([zero.name, one.name])  # no temporary folder left


def test_a_half_written_model_directory_is_replaced_whole(tmp_path):
    """A directory with weights but no record of its arguments (a build cut short by an older version, which wrote
    in place) is not taken for a model: it is rebuilt, and nothing of it is left."""
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"cut sh")
    (broken / "stray.txt").write_text("from the cut-short build")
    built = build_tiny_model(broken)
    assert not (built / "stray.txt").exists()
    weights = load_file(built / "model.safetensors")
    reference = load_file(build_tiny_model(tmp_path / "reference") / "model.safetensors")
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "reference"]


def _build_after(barrier, path, seed, results):
    barrier.wait()  # both builders start together
    results.put(str(build_tiny_model(path, seed=seed)))


def test_two_processes_building_one_model_at_once_both_get_it_whole(tmp_path):
    """Two builders of the same model in the same directory, released by one barrier: whichever renames first, both
    return the directory holding the complete model (the loser keeps the winner's), and no temporary folder is left.
    Holds for every interleaving, so no timing is assumed."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    target = tmp_path / "shared"
    procs = [ctx.Process(target=_build_after, args=(barrier, target, 3, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    assert [results.get(timeout=5) for _ in procs] == [str(target)] * 2
    weights = load_file(target / "model.safetensors")
    reference = load_file(build_tiny_model(tmp_path / "reference", seed=3) / "model.safetensors")
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference", "shared"]
