"""Start-up checks of what would otherwise fail an hour into a run, each error naming the config key.

`preflight(cfg)` runs before anything expensive (model build, warm-start, Ray): the output folder is writable,
its disk holds the checkpoints the run keeps, a configured model path exists here, is a model the run can use
(`check_model_dir`) and its context holds a prompt and its response (`check_model_context`). `check_shared`
runs once the actors' resources are placed: on a cluster of several nodes, every node that holds a learner rank
must see the driver's `trainer.output_dir` (the ranks write one checkpoint there together) and every node of an
engine or a learner rank the model directory (each loads it on its own node).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

from orchestration.cluster.cpus import resolve_cpus
from orchestration.config.errors import ConfigError
from orchestration.config.schema import TrainConf

FLOAT32_BYTES = 4
OPTIMIZER_COPIES = 3
"""The learner state per parameter: float32 master weight and AdamW's two moments."""


def model_params(cfg: TrainConf) -> tuple[int, int] | None:
    """(parameters, bytes per parameter of the model's own dtype), approximately, or None when the model is
    not a local directory (a hub id: its size is not known before it is downloaded)."""
    m = cfg.model
    if m.path is None:  # the tiny model, from its config: embeddings and LM head + attention and MLP per layer
        from rollout.tiny import VOCAB_SIZE  # heavy: torch and transformers

        h, kv = m.tiny_hidden_size, m.tiny_hidden_size * m.tiny_kv_heads // m.tiny_heads
        return 2 * VOCAB_SIZE * h + m.tiny_layers * (2 * h * h + 2 * h * kv + 3 * h * m.tiny_intermediate_size), 4
    path = Path(m.path)
    if not (path / "config.json").is_file():
        return None
    config = json.loads((path / "config.json").read_text())
    dtype_bytes = 2 if (config.get("dtype") or config.get("torch_dtype")) in ("bfloat16", "float16") else 4
    weight_bytes = sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))
    return weight_bytes // dtype_bytes, dtype_bytes


def checkpoint_bytes(cfg: TrainConf) -> tuple[int, int] | None:
    """(bytes of one checkpoint, of one snapshot), approximately: the learner's sharded state (3 × params ×
    4 B) plus, for a checkpoint, the HF export (params × the model's dtype). None when the size is unknown."""
    found = model_params(cfg)
    if found is None:
        return None
    params, dtype_bytes = found
    learner = OPTIMIZER_COPIES * FLOAT32_BYTES * params
    return learner + params * dtype_bytes, learner


def disk_needed(cfg: TrainConf) -> int | None:
    """Bytes the run's checkpoints and snapshots take at most: the kept checkpoints plus the one being written
    before the oldest is pruned (trainer.keep_checkpoints; 0 keeps one per trainer.save_every and the last),
    and two snapshots when trainer.snapshot_every is on."""
    sizes = checkpoint_bytes(cfg)
    if sizes is None:
        return None
    t = cfg.trainer
    saved = math.ceil(t.total_steps / t.save_every) + 1 if t.save_every else 1
    kept = min(t.keep_checkpoints + 1, saved) if t.keep_checkpoints else saved
    return kept * sizes[0] + (2 * sizes[1] if t.snapshot_every else 0)


def model_context(model_dir: str | Path) -> tuple[int, str] | None:
    """(the longest sequence, prompt + response, in tokens, that the model in `model_dir` takes; where that
    comes from), read from its config.json: `max_position_embeddings` (of `text_config` for a multimodal model),
    times a linear or dynamic RoPE scaling factor as vLLM applies it. None when there is no config.json or it
    does not say."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    config = config.get("text_config") or config
    tokens = config.get("max_position_embeddings")
    if not isinstance(tokens, int):
        return None
    where = f"max_position_embeddings={tokens} in {path}"
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type")) in ("linear", "dynamic") and rope.get("factor"):
        tokens = int(tokens * rope["factor"])
        where += f" × its RoPE scaling factor {rope['factor']}"
    return tokens, where


def check_model_context(
    model_dir: str | Path, max_prompt_tokens: int, max_response_tokens: int, allow_long: bool = False
) -> None:
    """ConfigError naming data.max_prompt_tokens, rollout.max_response_tokens and the model's
    max_position_embeddings when a prompt and its response cannot fit the model's context (the engines would
    refuse to start, or the model would run past the positions it was trained on). `allow_long`: vLLM's
    VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 is set (in the environment or cluster.env): the user chose a longer context."""
    found = model_context(model_dir)
    needed = max_prompt_tokens + max_response_tokens
    if allow_long:
        return
    if found is not None and needed > found[0]:
        raise ConfigError(
            f"data.max_prompt_tokens={max_prompt_tokens} + rollout.max_response_tokens={max_response_tokens} = "
            f"{needed} tokens exceeds the model's context of {found[0]} tokens ({found[1]}, model.path): lower "
            "one of the two keys, or extend the model's context (rope_scaling in its config.json; or, at your "
            "own risk, VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 in cluster.env, which vLLM and this check then accept)"
        )


def preflight(cfg: TrainConf) -> None:
    """Raise ConfigError, naming the key, for an output folder that is not writable or whose disk is too small
    for the configured checkpoints, a model.path that does not exist here (unless it is a hub id) or whose
    context is shorter than data.max_prompt_tokens + rollout.max_response_tokens, or cluster.rollout_cpus
    naming cores this machine does not have; a model.path directory the run cannot use (`check_model_dir`: its
    files, tokenizer, chat template, vocabulary, architecture), or a tiny model whose head size the engines
    cannot serve."""
    if cfg.cluster.rollout_cpus is not None and cfg.cluster.address is None:  # the workers run here
        try:
            resolve_cpus(cfg.cluster.rollout_cpus, "cluster.rollout_cpus")
        except ValueError as err:
            raise ConfigError(str(err)) from err
    out = Path(cfg.trainer.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test_{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"trainer.output_dir: {out} is not writable: {err}") from err
    path = cfg.model.path
    if path and path.startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
        raise ConfigError(f"model.path: {path!r} does not exist")
    head_sizes = engine_head_sizes(cfg)
    if path and Path(path).expanduser().is_dir():  # not a hub id: its files are here to check
        check_model_dir(path, "model.path", head_sizes=head_sizes)
    elif path is None and head_sizes is not None:
        head_dim = cfg.model.tiny_hidden_size // cfg.model.tiny_heads
        if head_dim not in head_sizes:
            raise ConfigError(
                f"model.tiny_hidden_size / model.tiny_heads: the tiny model's head size {head_dim} is not one that "
                f"vLLM's CPU attention supports {head_sizes} (rollout.engine={cfg.rollout.engine} on CPU)"
            )
    if path:  # a local model directory (a hub id has no config here yet)
        allow_long = {**cfg.cluster.env, **os.environ}.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN") == "1"  # vLLM's escape
        check_model_context(
            Path(path).expanduser(), cfg.data.max_prompt_tokens, cfg.rollout.max_response_tokens, allow_long
        )
    needed = disk_needed(cfg)
    free = shutil.disk_usage(out).free
    if needed is not None and needed > free:
        raise ConfigError(
            f"trainer.output_dir / trainer.keep_checkpoints / trainer.save_every: the run's checkpoints need about "
            f"{needed / 1e9:.1f} GB (each ≈ 3 × parameters × 4 B of learner state + the HF export), but {out} "
            f"has {free / 1e9:.1f} GB free"
        )


def engine_head_sizes(cfg: TrainConf) -> tuple[int, ...] | None:
    """The attention head sizes the run's engines can serve: vLLM's CPU attention's when the engines are vLLM
    on CPU (rollout.engine vllm, or auto with vLLM installed, and rollout.num_gpus_per_worker 0); None (any) for
    the transformers engine or engines on GPUs."""
    r = cfg.rollout
    if r.num_gpus_per_worker > 0 or r.engine == "hf":
        return None
    if r.engine == "auto" and importlib.util.find_spec("vllm") is None:
        return None
    from rollout.engine import CPU_SUPPORTED_HEAD_SIZES  # heavy: torch

    return CPU_SUPPORTED_HEAD_SIZES


WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""What transformers loads a model's weights from: an index naming its shards, else one file."""
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
"""Names (their ends) of the token-embedding tensor in the common causal-LM families."""
PROBE_MESSAGES = ({"role": "user", "content": "What is 1 + 1?"},)
"""The chat rendered to check a chat template."""


def check_model_dir(path: str | Path, key: str = "model.path", *, head_sizes: Sequence[int] | None = None) -> None:
    """Raise ConfigError naming `key`, the directory and the file or field, for a model directory the run cannot
    use, before any weight is loaded or engine started:
    * config.json missing, not JSON, or without a model_type that transformers knows as a causal LM;
    * no weights (model.safetensors, an index with its shards, or pytorch_model.bin), a shard the index names
      missing, or a safetensors file cut short (its header promises more bytes than the file has);
    * an embedding whose rows differ from config.json's vocab_size (read from the safetensors header);
    * no tokenizer vocabulary (AutoTokenizer then builds one of special tokens only), no chat template, a chat
      template that does not render a one-message chat, or more tokens than the embedding has rows (token ids
      would index past it);
    * a head size not in `head_sizes` (the engines' supported sizes; None: any).
    Reads config.json, the safetensors headers and the tokenizer: no weights, no torch model, no engine."""
    from transformers import AutoConfig, AutoTokenizer  # heavy: imported only when a model directory is checked
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from rollout.types import chat_prompt_ids  # heavy: torch

    folder = Path(path).expanduser()
    where = f"{key}: {path}"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{where} has no config.json (not a Hugging Face model directory, or one copied in part)")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}: config.json is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: config.json must hold a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(
            f"{where}: config.json model_type {model_type!r} is not a causal language model that this transformers "
            "knows (the learner loads the model with AutoModelForCausalLM), e.g. qwen2, llama, mistral"
        )
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as err:  # transformers raises ValueError, OSError, KeyError, TypeError for a bad config
        raise ConfigError(f"{where}: config.json does not load: {type(err).__name__}: {err}") from err
    text_config = config.get_text_config()
    vocab_size = getattr(text_config, "vocab_size", None)
    embedding = _check_weights(folder, where)
    if embedding is not None and vocab_size is not None and embedding[1] != vocab_size:
        raise ConfigError(f"{where}: the embedding {embedding[0]} has {embedding[1]} rows but config.json vocab_size "
                          f"is {vocab_size}")  # fmt: skip
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # whatever the tokenizer files' parser raises
        raise ConfigError(f"{where}: the tokenizer does not load: {type(err).__name__}: {err}") from err
    if len(tokenizer) <= len(tokenizer.added_tokens_decoder):
        raise ConfigError(
            f"{where}: no tokenizer vocabulary (tokenizer.json, or vocab.json and merges.txt, or tokenizer.model): "
            f"the tokenizer built from what is there holds only its {len(tokenizer)} special tokens"
        )
    if not tokenizer.chat_template:
        raise ConfigError(
            f"{where}: the tokenizer has no chat template (chat_template.jinja, or chat_template in "
            "tokenizer_config.json): every prompt is rendered with it; add the template the model was trained with"
        )
    try:
        chat_prompt_ids(tokenizer, PROBE_MESSAGES)
    except Exception as err:  # jinja2's TemplateError, or whatever the template itself raises
        raise ConfigError(
            f"{where}: the chat template does not render a one-message chat: {type(err).__name__}: {err}"
        ) from err
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ConfigError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocab_size} rows "
            f"(config.json vocab_size): token ids from {vocab_size} on would index past it (a tokenizer of "
            "another model?)"
        )
    if head_sizes is not None:
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        if head_dim not in head_sizes:
            raise ConfigError(
                f"{where}: the attention head size {head_dim} (config.json head_dim, or hidden_size / "
                f"num_attention_heads) is not one that vLLM's CPU attention supports {tuple(head_sizes)}: use "
                "rollout.engine=hf, or engines on GPUs (rollout.num_gpus_per_worker)"
            )


def _check_weights(folder: Path, where: str) -> tuple[str, int] | None:
    """ConfigError when the weights are missing or a safetensors file is cut short; returns (name, rows) of the
    token embedding when a safetensors header names it (None otherwise)."""
    for index_name in WEIGHT_INDEXES:
        index = folder / index_name
        if not index.is_file():
            continue
        try:
            shards = {folder / shard for shard in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()}
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"{where}: {index_name} is not a weight index ({{'weight_map': ...}}): {err}") from err
        missing = sorted(p.name for p in shards if not p.is_file())
        if missing:
            raise ConfigError(f"{where}: {index_name} names weight shard(s) that are missing: {missing}")
        break
    else:
        shards = {folder / name for name in WEIGHT_FILES if (folder / name).is_file()}
        if not shards:
            raise ConfigError(f"{where}: no weights (none of {', '.join(WEIGHT_FILES + WEIGHT_INDEXES)})")
    embedding = None
    for shard in sorted(shards):
        if shard.suffix != ".safetensors":
            if shard.stat().st_size == 0:
                raise ConfigError(f"{where}: the weights file {shard.name} is empty")
            continue
        for name, shape in _safetensors_shapes(shard, where).items():
            if embedding is None and name.endswith(EMBEDDING_SUFFIXES) and len(shape) == 2:
                embedding = (f"{name} ({shard.name})", shape[0])
    return embedding


def _safetensors_shapes(file: Path, where: str) -> dict[str, list[int]]:
    """{tensor name: shape} from a safetensors file's header; ConfigError when the file is cut short (shorter
    than its header says) or its header is not one."""
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            header_bytes = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if not 0 < header_bytes <= size - 8:
                raise ValueError(f"its header claims {header_bytes} bytes, the file has {size}")
            header = json.loads(f.read(header_bytes))
        tensors = {name: info for name, info in header.items() if name != "__metadata__"}
        data_bytes = max((int(info["data_offsets"][1]) for info in tensors.values()), default=0)
        shapes = {name: [int(d) for d in info["shape"]] for name, info in tensors.items()}
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise ConfigError(f"{where}: the weights file {file.name} is not a safetensors file ({err})") from err
    if 8 + header_bytes + data_bytes > size:
        raise ConfigError(
            f"{where}: the weights file {file.name} is cut short: its header promises {8 + header_bytes + data_bytes}"
            f" bytes, the file has {size} (an interrupted download or copy?)"
        )
    return shapes


def _probe(path: str, marker: str, token: str, write: bool) -> tuple[bool, str]:
    """On a node: (the driver's marker `marker` under `path` holds `token`, and "" or why this node's own marker
    could not be written). Runs as a Ray task pinned to the node."""
    import ray

    folder = Path(path)
    try:
        seen = (folder / marker).read_text() == token
    except OSError:
        seen = False
    if not (seen and write):
        return seen, ""
    try:
        (folder / f"{marker}.{ray.get_runtime_context().get_node_id()}").write_text(token)
        return True, ""
    except OSError as err:
        return True, f"cannot write there: {err}"


def check_shared(path: str, key: str, nodes: dict[str, list[str]], *, write: bool) -> None:
    """On a Ray cluster of several nodes: ConfigError naming `key` and the node (id and IP, and what it holds)
    when a node of `nodes` ({node id: what it holds}) does not see the folder `path` as the driver does.

    The driver writes a marker file with a random token into `path`; a task pinned to each node reads it back
    and, when `write` (the node writes there: checkpoint shards), writes a marker of its own, which the driver
    then reads; a relative `path` is checked as every actor uses it, relative to each process's working directory
    (under `ray job submit`: each node's own copy of the job's). A read-only folder is only checked to exist on
    every node. Nothing to check when every node is the driver's, or for a model that is not a local folder on
    the driver (a hub id: each node downloads it)."""
    import ray

    from actors import on_node  # heavy: Ray

    here = ray.get_runtime_context().get_node_id()
    others = {node: held for node, held in nodes.items() if node != here}
    if not others or (not write and not Path(path).exists()):  # one node, or a hub id every node downloads
        return
    folder = Path(path)  # as every actor gets it: a relative path is relative to each process's working directory
    token, marker = uuid.uuid4().hex, f".shared_check_{uuid.uuid4().hex[:8]}"
    driver_marker = folder / marker
    try:
        driver_marker.write_text(token)
    except OSError as err:
        if write:
            raise ConfigError(f"{key}: {folder.resolve()} is not writable from the driver: {err}") from err
        driver_marker = None  # a read-only model folder: check that it exists on every node instead
    probe = _probe if driver_marker else lambda p, *_: (Path(p).exists(), "")
    refs = {node: on_node(node, probe, path, marker, token, write) for node in others}
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    problems = []
    try:
        for node, ref in refs.items():
            seen, error = ray.get(ref, timeout=120)
            own = folder / f"{marker}.{node}"
            if not seen:
                problems.append((node, "does not see it (no such folder there, or another folder by that name)"))
            elif error:
                problems.append((node, error))
            elif write and not (own.is_file() and own.read_text() == token):
                problems.append(
                    (node, "writes to another folder by that name (its marker file never reached the driver)")
                )
    finally:
        for leftover in folder.glob(f"{marker}*"):
            leftover.unlink(missing_ok=True)
    if problems:
        where = "; ".join(f"node {node[:12]} ({ips.get(node, '?')}, holds {', '.join(others[node])}) {why}"
                          for node, why in problems)  # fmt: skip
        relative = (
            " A relative path is relative to each node's own copy of the job's working directory."
            if (not Path(path).is_absolute())
            else ""
        )
        raise ConfigError(
            f"{key}: {path} ({folder.resolve()} on the driver) is not the same folder on every node that "
            f"{'writes' if write else 'reads'} it: {where}.{relative} Put it on storage every node sees "
            f"(a shared filesystem mounted at the same path) and give an absolute path."
        )
