"""A tiny Qwen2 causal LM with a byte-level, one-token-per-byte tokenizer, for tests, demos and benchmarks.

No model can be downloaded on the development machine, so tests build one: `build_tiny_model(dir)` writes a
randomly initialised (deterministic from `seed`) float32 Qwen2 model in Hugging Face format that
`AutoModelForCausalLM`, `AutoTokenizer` and vLLM load with their normal loading code.

The tokenizer. For `model_type == "qwen2"`, `AutoTokenizer` (and therefore vLLM) ignores a saved custom
tokenizer pipeline and builds a byte-level Qwen2 (BPE) tokenizer from `vocab.json` + `merges.txt`. A naive
character vocab then silently drops spaces and newlines. So the vocab here *is* byte-level BPE without merges:
the 256 GPT-2 byte-to-unicode symbols (ids 0..255, in byte order), a ByteLevel pre-tokenizer with
`use_regex=False` and a ByteLevel decoder. Every UTF-8 byte is one token and any text round-trips exactly.
Special tokens follow: 256 `<|endoftext|>` (pad), 257 `<|im_start|>`, 258 `<|im_end|>` (eos). The chat
template is ChatML, as Qwen's.

Idempotent: the build arguments are saved as `tiny_model_args.json`; a directory that already holds a model
built with the same arguments is returned as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil

from actors.console import without_progress_bars

PAD_TOKEN = "<|endoftext|>"
BOS_CHAT_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
NUM_BYTE_TOKENS = 256
PAD_TOKEN_ID, IM_START_TOKEN_ID, EOS_TOKEN_ID = 256, 257, 258
VOCAB_SIZE = 259
ARGS_FILE = "tiny_model_args.json"
_FORMAT_VERSION = 1  # bump when the files written here change, so that old directories are rebuilt

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode symbols."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _build_tokenizer(output_dir: pathlib.Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_symbols = _bytes_to_unicode()
    vocab = {byte_symbols[b]: b for b in range(NUM_BYTE_TOKENS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in (PAD_TOKEN, BOS_CHAT_TOKEN, EOS_TOKEN)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[BOS_CHAT_TOKEN],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    fast.chat_template = CHAT_TEMPLATE
    ids = fast.convert_tokens_to_ids([PAD_TOKEN, BOS_CHAT_TOKEN, EOS_TOKEN])
    if ids != [PAD_TOKEN_ID, IM_START_TOKEN_ID, EOS_TOKEN_ID]:
        raise RuntimeError(f"unexpected special token ids {ids}")
    fast.save_pretrained(output_dir)
    # The files AutoTokenizer's Qwen2 tokenizer is built from: the byte vocab and an empty merge list.
    full_vocab = dict(vocab) | {
        PAD_TOKEN: PAD_TOKEN_ID,
        BOS_CHAT_TOKEN: IM_START_TOKEN_ID,
        EOS_TOKEN: EOS_TOKEN_ID,
    }
    (output_dir / "vocab.json").write_text(json.dumps(full_vocab, ensure_ascii=False))
    (output_dir / "merges.txt").write_text("#version: 0.2\n")


def build_tiny_model_in(parent: str | pathlib.Path, **kwargs) -> pathlib.Path:
    """`build_tiny_model(parent/seed<S>-<hash of the keyword arguments>, **kwargs)`: one directory per architecture
    and seed, so that runs of different tiny models never rebuild each other's (two runs started at once with
    different model.init_seed values once shared one directory, and one of them trained from the other's weights).
    The same arguments give the same directory, reused."""
    digest = hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:12]
    return build_tiny_model(pathlib.Path(parent) / f"seed{kwargs.get('seed', 0)}-{digest}", **kwargs)


def build_tiny_model(
    output_dir: str | pathlib.Path,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    vocab_size: int = VOCAB_SIZE,
    dtype: str = "float32",
    seed: int = 0,
) -> pathlib.Path:
    """Write a tiny random float32 Qwen2 causal LM plus tokenizer to `output_dir` and return its path.

    Deterministic from the arguments (the same arguments give bit-identical weights). If `output_dir` already
    holds a model built with the same arguments it is returned without rebuilding. The model is written into a
    temporary directory beside it and renamed into place, so no reader sees a half-written one; another model
    in `output_dir` is replaced (runs that may use several tiny models at once use `build_tiny_model_in`).

    vLLM's CPU attention supports head sizes 32, 64, 80, 96, 112, 128, ... only (head_dim 16 fails at the
    first forward with "Unsupported CPU attention configuration"), so keep hidden_size / num_attention_heads
    at 32 or more for a model vLLM will serve; the defaults give head_dim 32 with grouped-query attention.
    `vocab_size` above the tokenizer's VOCAB_SIZE pads the embedding with rows no token uses (a real model's
    shape, e.g. Qwen2.5's 151,936, for benchmarks that move weights); `dtype` the dtype of the saved weights
    (the learner exports its weights to the engines in it; float32 or bfloat16, as Qwen2.5's checkpoints).
    """
    if vocab_size < VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {VOCAB_SIZE} tokens")
    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"hidden_size {hidden_size} must divide by num_attention_heads {num_attention_heads}, which must "
            f"divide by num_key_value_heads {num_key_value_heads}"
        )
    output_dir = pathlib.Path(output_dir)
    build_args = {
        "format_version": _FORMAT_VERSION,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": tie_word_embeddings,
        "vocab_size": vocab_size,
        "dtype": dtype,
        "seed": seed,
    }
    if _holds(output_dir, build_args):
        return output_dir
    tmp = output_dir.with_name(f".{output_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_model(tmp, build_args)
    if _holds(output_dir, build_args):  # built meanwhile by another process: keep that one
        shutil.rmtree(tmp)
        return output_dir
    if output_dir.exists():  # another model, or one left half-written by an older version
        shutil.rmtree(output_dir)
    try:
        tmp.rename(output_dir)
    except OSError:  # another process renamed its build into place first
        shutil.rmtree(tmp)
        if not _holds(output_dir, build_args):
            raise
    return output_dir


def _holds(output_dir: pathlib.Path, build_args: dict) -> bool:
    """Whether `output_dir` holds a complete model built with `build_args` (ARGS_FILE is written last)."""
    args_path = output_dir / ARGS_FILE
    return args_path.is_file() and json.loads(args_path.read_text()) == build_args


def _write_model(output_dir: pathlib.Path, a: dict) -> None:
    """The model, tokenizer and ARGS_FILE of build arguments `a` into the (empty) directory `output_dir`."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=a["vocab_size"],
        hidden_size=a["hidden_size"],
        intermediate_size=a["intermediate_size"],
        num_hidden_layers=a["num_hidden_layers"],
        num_attention_heads=a["num_attention_heads"],
        num_key_value_heads=a["num_key_value_heads"],
        max_position_embeddings=a["max_position_embeddings"],
        tie_word_embeddings=a["tie_word_embeddings"],
        bos_token_id=IM_START_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        rope_theta=10000.0,
        dtype=a["dtype"],
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(a["seed"])
        model = Qwen2ForCausalLM(config).to(getattr(torch, a["dtype"]))
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config = GenerationConfig(
        bos_token_id=IM_START_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID
    )
    with without_progress_bars():
        model.save_pretrained(output_dir, safe_serialization=True)
    _build_tokenizer(output_dir)
    (output_dir / ARGS_FILE).write_text(json.dumps(a, indent=1))
