"""Generation engines: the `Engine` protocol, the vLLM engine, and the helpers every engine shares.

An engine turns prompts into `Sample`s (token ids, per-token log-probs, finish reason, policy version) and
takes new weights from the learner between steps. Two implementations keep the same contract:
`VLLMEngine` (this file, the real one) and `HFEngine` (rollout/hf_engine.py, a plain transformers
reference used by tests and as a fallback where vLLM is not installed).

Log-prob semantics (`logprobs_mode`). vLLM 0.32 can report the log-prob of each sampled token under
* "raw_logprobs" (default): log_softmax of the model's raw logits, before temperature, top-k/top-p and
  penalties. This is the model distribution π(·|x) at temperature 1: exactly what the learner's forward
  pass computes, so rollout and learner log-probs are directly comparable (and the mismatch metric means
  something). It is what the trainer uses.
* "processed_logprobs": log_softmax after temperature scaling and top-k/top-p masking: the distribution the
  token was actually drawn from (the behaviour policy in the strict sense).
With temperature=1, top_p=1, top_k=0 (the RL default) the two coincide.

Weight updates (tested on vLLM's CPU build). The contract is
`update_weights(named_tensors, policy_version)`: Hugging Face-named, full (unsharded) tensors, any number of
them, in any order. `VLLMEngine` drives it through vLLM's RL weight-transfer API (`LLM.start_weight_update`,
`update_weights`, `finish_weight_update`) with our transport, `rollout/weight_transfer.py`, registered with
vLLM's factory:
    begin_weight_update()            LLM.start_weight_update(): the transport begins vLLM's layer-wise reload
                                     (parameters back to their checkpoint layout; loaders buffer)
    load_weight_bucket(bucket) × k   LLM.update_weights({"update_info": {"bucket": ...}}): model.load_weights;
                                     a layer is copied into the live kernel tensors once all its weights arrived
    finish_weight_update(version)    LLM.finish_weight_update(str(version)): layers that got no weights keep
                                     their old values; the version becomes vLLM's weight version; then the
                                     prefix cache is reset (vLLM's API does not) and our version bumped
so a bucket may hold any subset of the tensors (even half of a fused qkv projection) and the update streams
bucket by bucket without a second full copy of the model. An update that fails part way is ended by our worker
extension (vLLM 0.32 has no abort; without it the next generate fails on layers left on the meta device).
Measured: calling `reload_weights` once per bucket does NOT work (each call finalizes the half-loaded fused
layers: wrong weights); `model.load_weights` outside the reload lifecycle fails on the CPU backend.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import pathlib
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch

from actors.console import add_filter_once
from rollout.types import LogprobsMode, Prompt, Sample, SamplingConfig, chat_prompt_ids

NamedTensors = Iterable[tuple[str, torch.Tensor]]

# vLLM's CPU attention kernels support only these head sizes (vllm/v1/attention/backends/cpu_attn.py).
CPU_SUPPORTED_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
DEFAULT_BUCKET_BYTES = 256 << 20


@runtime_checkable
class Engine(Protocol):
    """What the rollout worker needs from a generation engine."""

    policy_version: int
    max_model_len: int
    pad_token_id: int

    def generate(
        self, prompts: Sequence[Prompt], sampling: SamplingConfig, *, prompt_index_offset: int = 0
    ) -> list[Sample]:
        """n = sampling.n samples per prompt, in prompt order (prompt 0's n samples first).

        `prompt_index_offset` is added to each sample's prompt_index (a worker handling a shard of a larger
        batch reports global indices, and seeds depend on the global index).
        """
        ...

    def update_weights(self, named_tensors: NamedTensors, policy_version: int) -> None:
        """Load Hugging Face-named full tensors; later samples carry `policy_version`."""
        ...

    def begin_weight_update(self) -> None: ...

    def load_weight_bucket(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> int:
        """Load one bucket of an update begun with begin_weight_update; returns its size in bytes."""
        ...

    def finish_weight_update(self, policy_version: int) -> None: ...

    def abort_weight_update(self) -> None: ...

    def weight_version(self) -> str:
        """The engine's own record of the version its weights are at (vLLM's weight version; the transformers
        engine's policy version), which must equal the last finished update's policy version."""
        ...

    def shutdown(self) -> None: ...


def resolve_model_path(model: str | os.PathLike) -> str:
    """The model path as a string; a missing local path raises FileNotFoundError naming it.

    A string of the form "org/name" that is not a local directory is taken as a Hugging Face hub id, unless
    HF_HUB_OFFLINE is set (then it cannot be fetched, so it must exist locally).
    """
    path = pathlib.Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model path {str(model)!r} has no config.json")
        return str(path.resolve())
    text = str(model)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if looks_like_hub_id and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false"):
        return text
    raise FileNotFoundError(f"model path {text!r} does not exist")


def render_prompts(tokenizer, prompts: Sequence[Prompt], *, index_offset: int = 0) -> list[list[int]]:
    """Token ids of each prompt: chat messages through the chat template (add_generation_prompt=True),
    token-id lists as given. Errors name the prompt as `index_offset + position`."""
    if len(prompts) == 0:
        raise ValueError("generate: empty batch (no prompts)")
    rendered = []
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index_offset + index} is empty")
        if all(isinstance(item, dict) for item in prompt):
            rendered.append(chat_prompt_ids(tokenizer, prompt))
        elif all(isinstance(item, int) for item in prompt):
            rendered.append([int(t) for t in prompt])
        else:
            raise TypeError(
                f"prompt {index_offset + index} must be a list of chat messages (dicts) or of token ids (ints)"
            )
    return rendered


class PromptTooLongError(ValueError):
    """A prompt whose length + max_tokens exceeds the engine's context. `index` is its position in the
    `generate` call (with the caller's offset), so that the caller can name the row it came from."""

    def __init__(self, index: int, prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
        super().__init__(
            f"prompt {index} is too long: {prompt_tokens} prompt tokens + max_tokens {max_tokens} = "
            f"{prompt_tokens + max_tokens} > the model's context length max_model_len={max_model_len}"
        )
        self.index, self.prompt_tokens, self.max_tokens, self.max_model_len = (
            index, prompt_tokens, max_tokens, max_model_len
        )  # fmt: skip

    def __reduce__(self):  # crosses Ray intact (the default pickles only the message)
        return type(self), (self.index, self.prompt_tokens, self.max_tokens, self.max_model_len)


def check_prompt_lengths(
    prompt_ids: Sequence[Sequence[int]], max_tokens: int, max_model_len: int, *, index_offset: int = 0
) -> None:
    """Raise PromptTooLongError naming the first prompt whose length + max_tokens exceeds the model's context,
    before anything reaches vLLM."""
    for index, ids in enumerate(prompt_ids):
        if len(ids) + max_tokens > max_model_len:
            raise PromptTooLongError(index_offset + index, len(ids), max_tokens, max_model_len)


def generation_prompt_ids(engine, prompts: Sequence[Prompt], max_tokens: int, index_offset: int) -> list[list[int]]:
    """What every engine's `generate` starts with: the prompts rendered to token ids (render_prompts),
    checked against the engine's context (check_prompt_lengths), and a refusal while a weight update is in
    progress (`engine._update_active`). `engine` needs `tokenizer`, `max_model_len` and `_update_active`."""
    prompt_ids = render_prompts(engine.tokenizer, prompts, index_offset=index_offset)
    check_prompt_lengths(prompt_ids, max_tokens, engine.max_model_len, index_offset=index_offset)
    if engine._update_active:
        raise RuntimeError("generate called during a weight update (finish_weight_update first)")
    return prompt_ids


def iter_buckets(
    named_tensors: NamedTensors, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream of (name, tensor) into lists of at most `bucket_bytes` (a bigger tensor goes alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def bucket_nbytes(bucket: Sequence[tuple[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for _, t in bucket)


def stream_weight_update(engine: Engine, named_tensors: NamedTensors, policy_version: int) -> None:
    """The update lifecycle every engine shares: begin, load bucket by bucket, finish (new version); on any
    failure the update is aborted (the version stays) and the error re-raised."""
    engine.begin_weight_update()
    try:
        for bucket in iter_buckets(named_tensors):
            engine.load_weight_bucket(bucket)
    except BaseException:
        engine.abort_weight_update()
        raise
    engine.finish_weight_update(policy_version)


PREFIX_CACHE_LOGGER = "vllm.v1.core.block_pool"
PREFIX_CACHE_RESET = "Successfully reset prefix cache"


class PrefixCacheResetFilter(logging.Filter):
    """Drops vLLM's INFO line "Successfully reset prefix cache". finish_weight_update resets the cache on
    purpose after every push (and raises if the reset fails), so the line would otherwise repeat once per
    training step in the run's output. Only in this process: an engine core in a child process (vLLM's
    multiprocessing mode, the GPU default) still logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != PREFIX_CACHE_RESET


CPU_WORKER_LOGGER = "vllm.v1.worker.cpu_worker"
SKIPPED_SET_NUM_THREADS = "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding"


class SkippedSetNumThreadsFilter(logging.Filter):
    """Drops vLLM's CPU warning "CPU backend doesn't allow to use `torch.set_num_threads` after the thread
    binding, skip it". The CPU worker binds its threads, then replaces torch.set_num_threads (for the whole
    process, as the engine runs in-process here) by a function that only logs that line, and vLLM itself then
    calls it four times per engine start (traced: the worker's `set_torch_threads_for_runtime` in load_model, and
    the renderer warm-up entering and leaving `set_default_torch_num_threads` twice): nothing of ours, nothing to
    act on. Any other message of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(SKIPPED_SET_NUM_THREADS)


PRELOAD_NOTICE = "%s is not found in LD_PRELOAD. "
PRELOAD_LIBRARIES = ("libtcmalloc", "libiomp")


class PreloadNoticeFilter(logging.Filter):
    """Drops vLLM's CPU warnings "libtcmalloc is not found in LD_PRELOAD. For best performance, ..." and the
    same for libiomp (vllm/v1/worker/cpu_worker.py, `init_device`), one each per engine start. They suggest
    preloading an allocator and Intel's OpenMP for speed; the engine runs correctly without them (every test
    and demo here does), and vLLM checks LD_PRELOAD itself, so whoever preloads them for the engine's processes
    gets no notice anyway. Other messages of that logger pass, among them the one about speculative decoding
    without libiomp."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            str(record.msg).startswith(PRELOAD_NOTICE) and bool(record.args) and record.args[0] in PRELOAD_LIBRARIES
        )


TRITON_LOGGER = "torch._library.triton"
TRITON_MISSING = "Triton not available, find_triton_kernels = []"


class TritonMissingFilter(logging.Filter):
    """Drops torch's warning "Triton not available, find_triton_kernels = []" (torch/_library/triton.py). vLLM
    declares a Triton op at import (vllm/kernels/triton/activation.py) and torch, looking for its kernels,
    warns once per process where Triton is not installed, as on the CPU build (ENVIRONMENT.md: vLLM falls back
    cleanly). Other messages of that logger pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != TRITON_MISSING


REDUCE_OP_DEPRECATED = r"`torch\.distributed\.reduce_op` is deprecated"
REDUCE_OP_READER = r"vllm\.triton_utils\.dispatcher$"


def quiet_vllm_notices() -> None:
    """Turn off, in this process, the start-up notices of a vLLM engine that tell the user nothing to act on:
    the LD_PRELOAD and Triton notices (the filters above), and torch's FutureWarning "`torch.distributed.
    reduce_op` is deprecated" where vLLM's kernel dispatcher raises it: its scan of every module's attributes
    (vllm/triton_utils/dispatcher.py `_rebind_kernels`) touches torch's deprecated object; vLLM does not use
    it. That warning still shows for any other module that reads `reduce_op`. Idempotent."""
    add_filter_once(CPU_WORKER_LOGGER, PreloadNoticeFilter, PreloadNoticeFilter)
    add_filter_once(TRITON_LOGGER, TritonMissingFilter, TritonMissingFilter)
    warnings.filterwarnings("ignore", message=REDUCE_OP_DEPRECATED, category=FutureWarning, module=REDUCE_OP_READER)


NUMA_MEMBIND_NOTICE = b"NUMA binding: Using MEMBIND policy"


@contextlib.contextmanager
def drop_stderr_lines(markers: Sequence[bytes]) -> Iterator[None]:
    """While active, lines written to this process's stderr file descriptor (by C++ code too, which Python's
    logging and warnings filters never see) that contain one of `markers` are dropped; every other line passes
    through unchanged and in order. Used around a CPU engine's start, whose C++ extension prints a NUMA notice
    (`NUMA_MEMBIND_NOTICE`) straight to stderr. A child process started meanwhile keeps the filtered stream."""
    sys.stderr.flush()
    restore, forward_to = os.dup(2), os.dup(2)  # fd 2 to put back, and the forwarder's own copy of it
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as pipe, os.fdopen(forward_to, "wb", buffering=0) as out:
            for line in pipe:  # until every writer (fd 2 here, and any child that inherited it) has closed it
                if not any(marker in line for marker in markers):
                    out.write(line)

    forwarder = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(restore, 2)  # the pipe's write end held by fd 2 closes: the forwarder reaches the end
        os.close(restore)
        forwarder.join(timeout=5)  # a child process holding the pipe keeps it open: it keeps forwarding


def malloc_trim() -> Callable[[], int] | None:
    """glibc's `malloc_trim(0)`: hands the free pages of the heap back to the system (returns 1 if it did); None
    where the C library is not glibc."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


def resident_bytes() -> int:
    """This process's resident memory (RSS), bytes."""
    return int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class HeapTrimmer:
    """Returns the heap's free pages to the system once this process has grown `slack_bytes` past its size just
    after the previous trim (the first call trims).

    Why the CPU engine calls it after every generate: glibc keeps the memory vLLM's CPU build frees between rounds
    in its heap (each round's batch has new lengths, so new sizes are allocated), and an engine's resident memory
    grew 16-17% over 120 steps of the demo (bench/RESULTS.md, "Soak"). Trimming after every generate held it but
    made the engine's time per step ~10% longer (a trim walks the whole heap); trimming only past the slack
    bounds the growth at the slack, at no cost measurable in `bench.pipeline`. A malloc threshold
    (`MALLOC_MMAP_THRESHOLD_`) holds it too but slows every process it reaches (the demo's step 2.1 → 3.2 s).
    """

    def __init__(self, trim: Callable[[], int], slack_bytes: int = 96 * 2**20) -> None:
        self.trim, self.slack_bytes = trim, slack_bytes
        self.after_last_trim: int | None = None
        self.trims = 0

    def __call__(self) -> None:
        if self.after_last_trim is None or resident_bytes() > self.after_last_trim + self.slack_bytes:
            self.trim()
            self.trims += 1
            self.after_last_trim = resident_bytes()


class VLLMEngine:
    """A vLLM `LLM` in this process (set VLLM_ENABLE_V1_MULTIPROCESSING=0 to keep its engine core in-process
    too: 2 s start instead of ~14 s on CPU).

    model_path:           local Hugging Face model directory (or hub id when online).
    dtype:                "auto" (the checkpoint's) or e.g. "float32" / "bfloat16".
    max_model_len:        context length (prompt + response); None = the model's.
    tensor_parallel_size: GPUs per engine (1 on CPU).
    seed:                 engine seed (unseeded requests draw from it).
    logprobs_mode:        "raw_logprobs" (model distribution, default) or "processed_logprobs"; module doc.
    enforce_eager:        no CUDA graphs / torch.compile; None = True on CPU, False on GPU.
    engine_kwargs:        further `vllm.LLM` keyword arguments (e.g. gpu_memory_utilization).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        logprobs_mode: LogprobsMode = "raw_logprobs",
        enforce_eager: bool | None = None,
        engine_kwargs: dict | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer

        quiet_vllm_notices()  # before vLLM loads its kernels: the Triton notice comes then, once per process
        from vllm import LLM
        from vllm.platforms import current_platform

        from rollout.weight_transfer import BACKEND, WORKER_EXTENSION  # heavy: vLLM

        self.model_path = resolve_model_path(model_path)
        if logprobs_mode not in ("raw_logprobs", "processed_logprobs"):
            raise ValueError(f"logprobs_mode must be raw_logprobs or processed_logprobs, got {logprobs_mode!r}")
        on_cpu = current_platform.is_cpu()
        if on_cpu:
            config = AutoConfig.from_pretrained(self.model_path)
            text_config = getattr(config, "text_config", config)
            head_dim = getattr(text_config, "head_dim", None) or (
                text_config.hidden_size // text_config.num_attention_heads
            )
            if head_dim not in CPU_SUPPORTED_HEAD_SIZES:
                raise ValueError(
                    f"{self.model_path}: head_dim {head_dim} is not supported by vLLM's CPU attention "
                    f"(supported: {CPU_SUPPORTED_HEAD_SIZES})"
                )
        self.logprobs_mode = logprobs_mode
        self.policy_version = 0
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        engine_kwargs = dict(engine_kwargs or {})
        # weight updates through vLLM's RL weight-transfer API, with our transport (rollout/weight_transfer.py)
        engine_kwargs.setdefault("weight_transfer_config", {"backend": BACKEND})
        engine_kwargs.setdefault("worker_extension_cls", WORKER_EXTENSION)
        if on_cpu and "enable_chunked_prefill" not in engine_kwargs:
            # vLLM 0.32 CPU bug: when a seeded request's prefill is split over steps, the model runner rewinds
            # its torch.Generator with set_offset, which CPU generators lack ("CPU Generator does not use
            # offset"), and the engine dies. Without chunked prefill no prefill is split.
            context = max_model_len or text_config.max_position_embeddings
            engine_kwargs["enable_chunked_prefill"] = False
            engine_kwargs.setdefault("max_num_batched_tokens", max(context, 8192))
        # no "Loading safetensors checkpoint shards" bar: in a Ray actor's output it is an empty line and two bars
        engine_kwargs.setdefault("use_tqdm_on_load", False)
        quiet = contextlib.nullcontext()
        if on_cpu:  # vLLM's CPU start-up notices, which need nothing from the user (see the two filters)
            add_filter_once(CPU_WORKER_LOGGER, SkippedSetNumThreadsFilter, SkippedSetNumThreadsFilter)
            quiet = drop_stderr_lines([NUMA_MEMBIND_NOTICE])
        with quiet:
            self.llm = LLM(
                model=self.model_path,
                dtype=dtype,
                max_model_len=max_model_len,
                tensor_parallel_size=tensor_parallel_size,
                seed=seed,
                logprobs_mode=logprobs_mode,
                enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
                **engine_kwargs,
            )
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.llm.init_weight_transfer_engine({"init_info": {"policy_version": 0}})  # the transport's handshake
        add_filter_once(PREFIX_CACHE_LOGGER, PrefixCacheResetFilter, PrefixCacheResetFilter)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = self.tokenizer.eos_token_id if pad is None else pad
        self._update_active = False
        trim = malloc_trim() if on_cpu else None
        self._trim_heap = HeapTrimmer(trim) if trim is not None else None  # see HeapTrimmer

    def _sampling_params(self, sampling: SamplingConfig, prompt_index: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop),
            stop_token_ids=list(sampling.stop_token_ids),
            ignore_eos=sampling.ignore_eos,
            seed=sampling.sample_seed(prompt_index, 0),  # vLLM gives child i of a request seed + i
            logprobs=0,  # the log-prob of the sampled token only
        )

    def generate(
        self, prompts: Sequence[Prompt], sampling: SamplingConfig, *, prompt_index_offset: int = 0
    ) -> list[Sample]:
        prompt_ids = generation_prompt_ids(self, prompts, sampling.max_tokens, prompt_index_offset)
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        params = [self._sampling_params(sampling, prompt_index_offset + i) for i in range(len(prompt_ids))]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        samples = []
        for index, (ids, output) in enumerate(zip(prompt_ids, outputs, strict=True)):
            completions = sorted(output.outputs, key=lambda c: c.index)
            if len(completions) != sampling.n:
                raise RuntimeError(f"vLLM returned {len(completions)} samples for prompt {index}, not {sampling.n}")
            for completion in completions:
                if completion.finish_reason not in ("stop", "length"):
                    raise RuntimeError(
                        f"vLLM finished a sample of prompt {index} with reason {completion.finish_reason!r}"
                    )
                token_ids = tuple(completion.token_ids)
                log_probs = torch.tensor(
                    [position[token].logprob for position, token in zip(completion.logprobs, token_ids)],
                    dtype=torch.float32,
                )
                samples.append(
                    Sample(
                        prompt_index=prompt_index_offset + index,
                        prompt_ids=tuple(ids),
                        response_ids=token_ids,
                        log_probs=log_probs,
                        finish_reason=completion.finish_reason,
                        policy_version=self.policy_version,
                        text=completion.text,
                    )
                )
        if self._trim_heap is not None:
            self._trim_heap()
        return samples

    # A weight update goes through vLLM's RL weight-transfer lifecycle with our transport (rollout/weight_transfer.py):
    # start, one update per bucket, finish with the policy version as vLLM's weight version.
    def begin_weight_update(self) -> None:
        if self._update_active:
            raise RuntimeError("begin_weight_update called twice without finish_weight_update")
        self.llm.start_weight_update()
        self._update_active = True

    def load_weight_bucket(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> int:
        if not self._update_active:
            raise RuntimeError("load_weight_bucket called outside begin_weight_update / finish_weight_update")
        bucket = list(bucket)
        self.llm.update_weights({"update_info": {"bucket": bucket}})
        return bucket_nbytes(bucket)

    def finish_weight_update(self, policy_version: int) -> None:
        if not self._update_active:
            raise RuntimeError("finish_weight_update called without begin_weight_update")
        self.llm.finish_weight_update(str(int(policy_version)))
        self._update_active = False
        # Cached prefixes hold KV computed with the old weights: drop them (vLLM's API does not).
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after the weight update")
        self.policy_version = int(policy_version)

    def abort_weight_update(self) -> None:
        """End an update that failed part way: layers already complete keep their new values, the others
        their old ones (the model is then a mix: push a full update again). The version is not bumped."""
        if self._update_active:
            self.llm.collective_rpc("fipo_abort_weight_update")
            self._update_active = False
            self.llm.reset_prefix_cache()

    def update_weights(self, named_tensors: NamedTensors, policy_version: int) -> None:
        stream_weight_update(self, named_tensors, policy_version)

    # A push driven from the learner's side (learner/transfer.py): the handshake, then per push begin,
    # receive_weights (the bytes arrive over the transport the handshake opened), finish.
    def init_weight_transfer(self, init_info: dict) -> None:
        """vLLM's `init_weight_transfer_engine` with `init_info` (e.g. the gloo group's address, port, world
        size); replaces the previous handshake."""
        self.llm.init_weight_transfer_engine({"init_info": {"policy_version": self.policy_version, **init_info}})

    def receive_weights(self, update_info: dict) -> None:
        """vLLM's `update_weights` with `update_info` (e.g. the layout of the buckets about to be broadcast)."""
        if not self._update_active:
            raise RuntimeError("receive_weights called outside begin_weight_update / finish_weight_update")
        self.llm.update_weights({"update_info": update_info})

    def weight_version(self) -> str:
        return self.llm.get_weight_version()

    def shutdown(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            self.llm = None
            gc.collect()
