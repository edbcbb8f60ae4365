"""Will it fit? Each role's GPU memory, from the config alone, before a single GPU is reserved.

    python -m tools.plan [the same Hydra overrides as train]     e.g. experiment=fipo_32b cluster.gpu=h200

prints, for the configured cluster and recipe, a table per role and a verdict, without loading weights and
without a GPU:

* **a learner rank**: its peak measured by running the learner's own code (the model built from its
  config.json, FSDP2 over `learner.world_size` ranks, AdamW, one optimizer step over the worst micro-batch: a
  budget of `learner.micro_batch_tokens` filled with samples of `data.max_prompt_tokens` +
  `rollout.max_response_tokens`, run after another whose gradients it holds when a rank's mini-batch takes
  several) on fake tensors (learner/memory_plan.py), broken down at that moment: the
  float32 master shards, gradients and AdamW moments, the all-gathered layers in the compute dtype,
  activations (of which the LM head and its log-softmax), temporaries; then what the fake run cannot see, as
  named lines: FSDP2's prefetch of the next layer on a GPU, the frozen reference model (GRPO's KL), the caching
  allocator's headroom (ALLOCATOR_HEADROOM of the peak), and `cluster.gpu_reserved_gib` outside PyTorch;
* **an engine** (vLLM, `rollout.tensor_parallel_size` GPUs): weights per GPU, KV-cache bytes per token
  (layers × KV heads on this GPU × head dim × 2 × dtype), the KV capacity at `rollout.gpu_memory_utilization`
  after weights and a forward's working memory (an estimate: ENGINE_WORKSPACE_GIB plus one prefill chunk), and
  how many waves a generation round's sequences (prompts per engine × n × (prompt + response tokens)) take;
* **a verdict per role** against the GPU's memory (`cluster.gpu`, `cluster.gpu_memory_gib`), and when one does
  not fit, the keys that would make it fit: re-measured (activation checkpointing, a chunked LM head) or
  extrapolated from the measurement and labelled so (micro-batch tokens: activations grow linearly in the
  micro-batch's positions; world size: the sharded state shrinks as 1 / ranks).

On a GPU cluster the same check runs at start-up before any actor is created (`check_fit`; `cluster.check_fit`
false skips it). Validation: docs/fit.md.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from orchestration.config.components import learner_config, sizes_from_config, tiny_model_args
from orchestration.config.errors import ConfigError
from orchestration.config.gpus import GPU_MEMORY_GIB

GIB = 2**30
ALLOCATOR_HEADROOM = 0.05
"""Share of the learner's measured peak kept free for the caching allocator's fragmentation (with
expandable_segments, which bench and the learner set)."""
ENGINE_WORKSPACE_GIB = 1.5
"""An engine's memory besides weights, KV cache and one forward's activations: CUDA graphs, sampler buffers,
the allocator's slack (an estimate, not measured here)."""
SHAPES_DIR = Path(__file__).resolve().parents[2] / "conf" / "model" / "shapes"


@dataclass
class RolePlan:
    """One role's table (label, bytes, note), what it needs against what it has, and advice when it does not fit."""

    key: str
    """learner | engine"""
    name: str
    rows: list[tuple[str, float, str]] = field(default_factory=list)
    need: float = 0.0
    have: float = 0.0
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.need <= self.have

    def render(self) -> str:
        lines = [self.name]
        for label, value, note in self.rows:
            lines.append(f"  {label:<46} {value / GIB:9.2f} GiB  {note}".rstrip())
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"  {'needs':<46} {self.need / GIB:9.2f} GiB  of {self.have / GIB:.2f} GiB → {verdict}")
        lines += [f"  {note}" for note in self.notes]
        if not self.fits:
            lines += ["  would fit with: " + (" | ".join(self.advice) if self.advice else "nothing found here")]
        return "\n".join(lines)


@dataclass
class Plan:
    header: str
    roles: list[RolePlan]

    @property
    def fits(self) -> bool:
        return all(role.fits for role in self.roles)

    def summary(self) -> dict:
        """The verdicts as one JSON-able dict (the CLI's last line)."""
        roles = {r.key: {"need_gib": r.need / GIB, "have_gib": r.have / GIB, "fits": r.fits} for r in self.roles}
        return {"fits": self.fits, "roles": roles}

    def render(self) -> str:
        verdict = (
            "every role fits" if self.fits else "does not fit: " + ", ".join(r.key for r in self.roles if not r.fits)
        )
        return "\n\n".join([self.header, *(r.render() for r in self.roles), f"Verdict: {verdict}"])


def gpu_memory_bytes(cfg) -> float:
    c = cfg.cluster
    return (c.gpu_memory_gib if c.gpu_memory_gib is not None else GPU_MEMORY_GIB[c.gpu]) * GIB


def model_dir_for_plan(cfg, scratch: Path) -> str:
    """A directory holding the policy's config.json: model.path when it is a local directory, the shipped
    shapes (conf/model/shapes) of a hub id, the hub's own config when online, or the tiny model (path null)."""
    path = cfg.model.path
    if path is None:
        from rollout.tiny import build_tiny_model_in  # heavy: torch and transformers

        return str(build_tiny_model_in(cfg.model.tiny_dir, **tiny_model_args(cfg)))
    if (Path(path).expanduser() / "config.json").is_file():
        return str(Path(path).expanduser())
    shipped = SHAPES_DIR / (path.replace("/", "--") + ".json")
    if shipped.is_file():
        text = shipped.read_text()
    else:
        try:
            from transformers import AutoConfig

            text = AutoConfig.from_pretrained(path).to_json_string()
        except OSError as err:
            raise ConfigError(
                f"model.path: {path!r} is neither a local directory with a config.json nor a hub id with shapes in "
                f"{SHAPES_DIR} (and the hub is not reachable: {err})"
            ) from err
    (scratch / "config.json").write_text(text)
    return str(scratch)


def worst_case_batch(cfg, vocab_size: int, samples_per_rank: int):
    """One mini-batch in which every rank's micro-batch is the worst the config allows: `learner.micro_batch_tokens`
    positions (or one longest sample, `data.max_prompt_tokens` + `rollout.max_response_tokens`, if that is
    longer), as few samples as fill it, equal in length, no prompt shared; at most `samples_per_rank` (the
    mini-batch's samples per rank) at their longest when they cannot fill it. When the mini-batch holds more
    samples per rank than one micro-batch, each rank gets two such micro-batches: the second runs while the
    first one's gradients are held, as every micro-batch after the first does. Host tensors."""
    from learner.synthetic import random_batch  # heavy: torch

    prompt, response = cfg.data.max_prompt_tokens, cfg.rollout.max_response_tokens
    budget = cfg.learner.micro_batch_tokens
    per_micro_batch = max(1, math.ceil(budget / (prompt + response)))
    if per_micro_batch > samples_per_rank:  # the whole mini-batch fits in one micro-batch
        per_micro_batch = samples_per_rank
    elif per_micro_batch > 1:  # several samples of budget / per_micro_batch positions, the prompt ≤ half of one
        length = budget // per_micro_batch
        prompt = min(prompt, length // 2)
        response = length - prompt
    micro_batches = 2 if samples_per_rank > per_micro_batch else 1
    return random_batch(
        micro_batches * per_micro_batch * cfg.learner.world_size,
        vocab_size=vocab_size,
        prompt_len=(prompt, prompt),
        response_len=(response, response),
        group_size=1,
    )


def _measure(cfg, sizes, model_dir: str, model_config, **learner_overrides):
    learner = replace(cfg.learner, **learner_overrides)
    cfg = replace(cfg, learner=learner)
    batch = worst_case_batch(cfg, model_config.vocab_size, sizes.mini_batch_samples_per_rank)
    config = replace(learner_config(cfg, sizes, model_dir), mini_batch_samples=batch.num_samples)
    from learner.memory_plan import measure_update  # heavy: torch, FSDP2

    return measure_update(config, learner.world_size, batch)


def _learner_need(memory, gpu_prefetch: bool) -> tuple[float, list[tuple[str, float, str]]]:
    """(bytes a rank needs, the extra rows) on top of the measured peak."""
    extra = [("prefetch of the next layer (FSDP2 on GPU)", float(memory.layer_bytes) if gpu_prefetch else 0.0, "")]
    extra.append(("reference model (KL term)", float(memory.reference), "" if memory.reference else "none"))
    extra.append(("allocator headroom", ALLOCATOR_HEADROOM * memory.peak, f"{ALLOCATOR_HEADROOM:.0%} of the peak"))
    return memory.peak + sum(value for _, value, _ in extra), extra


def plan_learner(cfg, sizes, model_dir: str, model_config, usable: float, gpu: bool) -> RolePlan:
    ln = cfg.learner
    memory = _measure(cfg, sizes, model_dir, model_config)
    need, extra = _learner_need(memory, gpu)
    layout = (
        f"{'packed' if ln.packing else 'padded'}, checkpointing {'on' if ln.activation_checkpointing else 'off'}, "
        f"LM head {'in chunks of ' + str(ln.logprob_chunk_tokens) if ln.logprob_chunk_tokens else 'unchunked'}"
    )
    held = " after another (its gradients held)" if memory.held_gradients else ""
    role = RolePlan(
        "learner",
        f"Learner rank (FSDP2 over {ln.world_size}, {ln.param_dtype} compute, float32 master; one micro-batch of "
        f"{memory.micro_batch_positions} positions{held}, {layout})",
        need=need,
        have=usable,
    )
    parts = memory.parts
    names = [
        ("params", "parameters (float32 shard)"),
        ("grads", "gradients (float32 shard)"),
        ("optimizer", "AdamW moments (+ one parameter's temporaries)"),
        ("gathered", "all-gathered layer(s), compute dtype"),
        ("reduce_scatter", "reduce-scatter buffers"),
        ("activations", "activations"),
        ("temporaries", "backward temporaries"),
        ("inputs", "micro-batch inputs"),
        ("buffers", "buffers (rotary tables)"),
    ]
    for key, label in names:
        if parts.get(key):
            note = f"LM head + log-softmax alone peak at {memory.head / GIB:.2f} GiB" if key == "activations" else ""
            role.rows.append((label, float(parts[key]), note))
    role.rows.append(("measured peak (fake tensors)", float(memory.peak), ""))
    role.rows += extra
    if not role.fits:
        role.advice = learner_advice(cfg, sizes, model_dir, model_config, memory, usable, gpu)
    return role


def learner_advice(cfg, sizes, model_dir, model_config, memory, usable: float, gpu: bool) -> list[str]:
    """The keys that would make a rank fit. Activation checkpointing and a chunked LM head, where off, are
    re-measured (each alone, then together); for the measured layouts that still do not fit, the micro-batch
    budget and the world size are extrapolated from the measurement, and labelled so."""
    ln = cfg.learner
    features = {
        "learner.activation_checkpointing=true": {"activation_checkpointing": True},
        "learner.logprob_chunk_tokens=1024": {"logprob_chunk_tokens": 1024},
    }
    missing = {key: o for key, o in features.items() if any(getattr(ln, k) != v for k, v in o.items())}
    variants = [([], memory)]
    combos = [[key] for key in missing] + ([list(missing)] if len(missing) > 1 else [])
    for keys in combos:
        overrides = {k: v for key in keys for k, v in missing[key].items()}
        variants.append((keys, _measure(cfg, sizes, model_dir, model_config, **overrides)))
    advice = []
    for keys, measured in variants:
        need = _learner_need(measured, gpu)[0]
        if keys and need <= usable:
            advice.append(f"{' '.join(keys)} (measured: {need / GIB:.1f} GiB)")
            continue
        advice += [" ".join([*keys, hint]) for hint in _extrapolate(cfg, measured, usable, gpu)]
    return advice or ["nothing found here: a larger GPU, or a smaller model"]


def _extrapolate(cfg, memory, usable: float, gpu: bool) -> list[str]:
    """Micro-batch budget and world size that would fit, extrapolated from one measurement: what stays whatever
    the micro-batch (parameters, AdamW moments, buffers, and the gradients, which reach the parameters' size by the
    end of backward) shrinks as 1 / ranks; the rest of the peak grows linearly in the micro-batch's positions."""
    resident = 2 * memory.parts.get("params", 0) + memory.parts.get("optimizer", 0) + memory.parts.get("buffers", 0)
    dynamic = (1 + ALLOCATOR_HEADROOM) * max(memory.peak - resident, 0)
    fixed = (1 + ALLOCATOR_HEADROOM) * resident + memory.reference
    prefetch = memory.layer_bytes if gpu else 0
    hints = []
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens
    per_position = dynamic / max(memory.micro_batch_positions, 1)
    if per_position > 0 and usable > fixed + prefetch:
        tokens = int((usable - fixed - prefetch) / per_position) // 1024 * 1024
        if longest <= tokens < cfg.learner.micro_batch_tokens:
            hints.append(f"learner.micro_batch_tokens={tokens} (extrapolated: {per_position / 2**20:.2f} MiB/position)")
    for factor in (2, 4, 8, 16, 32):
        if fixed / factor + dynamic + prefetch <= usable:
            ranks = cfg.learner.world_size * factor
            hints.append(f"learner.world_size={ranks} (extrapolated: the sharded state ÷ {factor})")
            break
    return hints


def plan_engine(cfg, sizes, model_config, params: int, gpu_bytes: float) -> RolePlan:
    """One engine's plan; `params`: the model's parameter count (`count_parameters`)."""
    r = cfg.rollout
    tp = r.tensor_parallel_size
    dtype = (getattr(model_config, "dtype", None) or "bfloat16") if r.dtype == "auto" else r.dtype
    dtype_bytes = 4 if str(dtype).endswith("float32") else 2
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    kv_heads = getattr(model_config, "num_key_value_heads", heads)
    kv_heads_per_gpu = max(1, math.ceil(kv_heads / tp))  # more GPUs than KV heads: vLLM replicates them
    kv_per_token = model_config.num_hidden_layers * 2 * kv_heads_per_gpu * head_dim * dtype_bytes
    chunk = 8192  # vLLM's default max_num_batched_tokens on a GPU: one prefill chunk's activations
    h, i = model_config.hidden_size, model_config.intermediate_size

    def weights_and_forward(t: int) -> tuple[float, float]:  # per GPU at tensor parallel t
        return params * dtype_bytes / t, chunk * (4 * h + 3 * i / t) * dtype_bytes

    weights, forward = weights_and_forward(tp)
    budget = r.gpu_memory_utilization * gpu_bytes
    kv_bytes = budget - weights - forward - ENGINE_WORKSPACE_GIB * GIB
    capacity = max(int(kv_bytes // kv_per_token), 0)
    sequence = cfg.data.max_prompt_tokens + r.max_response_tokens
    prompts = math.ceil(sizes.gen_batch_prompts / r.num_workers)
    sequences = prompts * sizes.group_size
    round_tokens = sequences * sequence
    role = RolePlan(
        "engine",
        f"Engine (vLLM, tensor parallel {tp}, {dtype}; {r.num_workers} engine(s))",
        need=weights + forward + ENGINE_WORKSPACE_GIB * GIB + sequence * kv_per_token,
        have=budget,
    )
    role.rows = [
        ("weights per GPU", weights, f"{params / 1e9:.2f}B parameters ÷ {tp}"),
        ("forward working memory", forward, f"a {chunk}-token prefill chunk (estimate)"),
        ("CUDA graphs, sampler, slack", ENGINE_WORKSPACE_GIB * GIB, "estimate"),
        ("KV cache", max(kv_bytes, 0.0), f"the rest of gpu_memory_utilization={r.gpu_memory_utilization}"),
    ]
    kv_note = (
        f"KV cache: {kv_per_token / 1024:.0f} KiB per token ({model_config.num_hidden_layers} layers × 2 × "
        f"{kv_heads_per_gpu} KV head(s) × {head_dim} × {dtype_bytes} B) → {capacity:,} tokens"
    )
    waves = math.ceil(round_tokens / capacity) if capacity else math.inf
    role.notes = [
        kv_note,
        f"a generation round: {prompts} prompts × {sizes.group_size} = {sequences} sequences per engine × ≤ "
        f"{sequence} tokens = {round_tokens:,} tokens → {waves} wave(s) of the KV cache at the longest",
        '("needs": weights, working memory and one longest sequence\'s KV cache, within gpu_memory_utilization)',
    ]
    if not role.fits:
        for more in (2, 4, 8):
            t = tp * more
            if sum(weights_and_forward(t)) + ENGINE_WORKSPACE_GIB * GIB < budget:
                role.advice.append(f"rollout.tensor_parallel_size={t} (and rollout.num_gpus_per_worker={t})")
                break
        if r.gpu_memory_utilization < 0.95:
            role.advice.append("rollout.gpu_memory_utilization=0.95 (if nothing else shares the GPU)")
    return role


def count_parameters(model_config) -> int:
    """Parameters of the model `model_config` describes (built on the meta device: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return sum(p.numel() for p in model.parameters())


def plan(cfg) -> Plan:
    """The plan of a composed config (a TrainConf). Seconds to a minute (a fake run of the learner's step)."""
    from transformers import AutoConfig

    sizes = sizes_from_config(cfg)
    gpu = cfg.learner.num_gpus_per_rank > 0
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = model_dir_for_plan(cfg, Path(scratch))
        model_config = AutoConfig.from_pretrained(model_dir)
        gpu_bytes = gpu_memory_bytes(cfg)
        if gpu:
            usable = gpu_bytes - cfg.cluster.gpu_reserved_gib * GIB
            where = (
                f"{cfg.cluster.gpu} ({gpu_bytes / GIB:.1f} GiB per GPU, {cfg.cluster.gpu_reserved_gib} GiB outside "
                "PyTorch)"
            )
        else:
            import psutil

            usable = psutil.virtual_memory().total / max(cfg.learner.world_size, 1)
            where = f"this machine's memory ({usable * cfg.learner.world_size / GIB:.1f} GiB shared by the ranks)"
        params = count_parameters(model_config)
        learner = plan_learner(cfg, sizes, model_dir, model_config, usable, gpu)
        roles = [learner]
        if gpu or cfg.rollout.num_gpus_per_worker > 0:
            roles.append(plan_engine(cfg, sizes, model_config, params, gpu_bytes))
    header = (
        f"Plan: {cfg.model.path or 'the tiny model'} ({params / 1e9:.2f}B parameters), "
        f"{cfg.learner.world_size} learner rank(s), {cfg.rollout.num_workers} engine(s); on {where}\n"
        + sizes.describe()
    )
    return Plan(header, roles)


def check_fit(cfg) -> Plan:
    """At start-up on a GPU cluster: the plan, or ConfigError with the plan and its advice when a role cannot
    fit (cluster.check_fit=false skips the check)."""
    result = plan(cfg)
    if not result.fits:
        raise ConfigError(
            "the configuration does not fit its GPUs (cluster.check_fit=false skips this check):\n" + result.render()
        )
    return result
