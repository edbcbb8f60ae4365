"""How a step's batch is cut for the update: mini-batches → ranks → micro-batches, and a micro-batch's inputs.

Pure functions of the batch's masks (no model, no process group), computed on the host once per step; every
rank computes the plan of every rank and they all agree without talking:

* mini-batches: consecutive blocks of `mini_batch_samples` rows, in batch order (no shuffle, one epoch);
* ranks: each rank gets `mini_batch_samples / world_size` samples of each mini-batch, balanced by tokens
  (longest first, each sample to the rank with the fewest tokens so far that still has room);
* micro-batches: a rank's samples, longest first, go into the first micro-batch whose cost stays within
  `micro_batch_tokens` (first-fit decreasing; a sample over the budget is a micro-batch of its own). The cost
  is the tokens computed: Σ (prompt + response) when packed, rows × (longest prompt + longest response) when
  padded. FSDP runs one all-gather per layer per forward, so all ranks run the same number of micro-batches:
  ranks that have fewer split their costliest one in two until they have as many (a rank has at least as
  many samples as any rank has micro-batches, so this always ends).

Shared prompts (`prompt_keys` given, packed only): the samples of a group repeat one prompt, and a causal
model computes the same outputs at those prompt positions for each of them, so a packed micro-batch holds
each distinct prompt once, followed by the responses of its samples there (`micro_batch_inputs(...,
share_prompts=True)`). The plan keeps a group together where it can: whole groups go to ranks (largest
first, to the least-loaded rank with room for the whole group; a group that fits nowhere whole is spread row
by row) and into micro-batches (the cost of a row is its response alone when its prompt is already in the
micro-batch), and a micro-batch's rows stay in group order, so the samples of one prompt are consecutive.

Two layouts of a micro-batch's model inputs (`micro_batch_inputs`):

* packed (the default): the samples' real tokens [prompt | response] concatenated into one row, positions
  restarting at 0 per sample, block-diagonal causal attention (learner/attention.py): no padding at all;
  with shared prompts, one segment per distinct prompt, [prompt | response 1 | response 2 | ...], each
  response at positions P, P + 1, ... attending to the prompt and causally to itself only;
* padded (the reference): one row per sample, [left-padded prompt | right-padded response], an attention mask.

`compute_log_probs` and `update` both use the same plan and inputs, so a row is always computed in the same
micro-batch with the same layout: the old log-probs are bitwise the training forward's at θ = θ_old.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from advantage import REWARD_OK, RolloutBatch
from learner.attention import AttentionRows, shared_prompt_rows


def response_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """[B] int64: 1 + the index of the last True of each row of `response_mask` [B, T] (0 for an empty row)."""
    positions = torch.arange(1, response_mask.shape[-1] + 1, device=response_mask.device)
    return (response_mask.bool() * positions).amax(-1) if response_mask.shape[-1] else response_mask.sum(-1)


def loss_mask(batch: RolloutBatch) -> torch.Tensor:
    """[B, T] bool: response tokens that enter the loss (samples whose reward is not OK leave it)."""
    mask = batch.response_mask.bool()
    if batch.reward_status is not None:
        mask = mask & (batch.reward_status == REWARD_OK).unsqueeze(-1)
    return mask


# ----------------------------------------------------------------------------------------------------------
# the plan


class _Bin:
    """A micro-batch being filled: its rows and what its cost depends on."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.keys: set[int] = set()
        self.tokens = 0
        self.max_prompt = 0
        self.max_response = 0

    def cost_with(self, prompt: int, response: int, packing: bool, key: int | None = None) -> int:
        if packing:
            return self.tokens + (0 if key in self.keys else prompt) + response
        return (len(self.rows) + 1) * (max(self.max_prompt, prompt) + max(self.max_response, response))

    def add(self, row: int, prompt: int, response: int, key: int | None = None) -> None:
        self.tokens += (0 if key in self.keys else prompt) + response
        self.rows.append(row)
        if key is not None:
            self.keys.add(key)
        self.max_prompt = max(self.max_prompt, prompt)
        self.max_response = max(self.max_response, response)


def _cost(
    rows: Sequence[int],
    prompt_len: Sequence[int],
    resp_len: Sequence[int],
    packing: bool,
    keys: Sequence[int] | None = None,
) -> int:
    """Positions a micro-batch of `rows` computes: Σ tokens packed (each distinct prompt once when `keys` are
    given), rows × (longest prompt + longest response, each at least 1) padded."""
    if packing:
        prompts = [prompt_len[i] for i in rows] if keys is None else {keys[i]: prompt_len[i] for i in rows}.values()
        return sum(prompts) + sum(resp_len[i] for i in rows)
    return len(rows) * (max(1, *(prompt_len[i] for i in rows)) + max(1, *(resp_len[i] for i in rows)))


def _units(rows: Sequence[int], prompt_len, resp_len, keys: Sequence[int] | None) -> list[list[int]]:
    """`rows` as the units the plan keeps together, costliest first (ties: the earlier row first): one row each
    without `keys`; with them, the rows of each prompt (cost: the prompt once plus the responses)."""
    if keys is None:
        return [[row] for row in sorted(rows, key=lambda i: (-(prompt_len[i] + resp_len[i]), i))]
    groups: dict[int, list[int]] = {}
    for row in rows:
        groups.setdefault(keys[row], []).append(row)
    units = [sorted(g, key=lambda i: (-resp_len[i], i)) for g in groups.values()]
    return sorted(units, key=lambda u: (-_cost(u, prompt_len, resp_len, True, keys), min(u)))


def _assign_ranks(
    rows: Sequence[int], prompt_len, resp_len, world_size: int, keys: Sequence[int] | None
) -> list[list[int]]:
    """`rows` split into `world_size` equal-size parts with balanced costs: each unit (`_units`, costliest
    first) to the least-loaded part with room for all of it (ties to the lower rank); a unit that fits in no
    part whole goes row by row (longest first) to the least-loaded part with room."""
    share = len(rows) // world_size
    parts: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for unit in _units(rows, prompt_len, resp_len, keys):
        room = [r for r in range(world_size) if len(parts[r]) + len(unit) <= share]
        if room:
            rank = min(room, key=lambda r: (loads[r], r))
            parts[rank] += unit
            loads[rank] += _cost(unit, prompt_len, resp_len, True, keys)
            continue
        for row in unit:
            rank = min((r for r in range(world_size) if len(parts[r]) < share), key=lambda r: (loads[r], r))
            parts[rank].append(row)
            loads[rank] += prompt_len[row] + resp_len[row]
    return parts


def _fill(rows: list[int], prompt_len, resp_len, budget: int, packing: bool, keys) -> list[list[int]]:
    """First-fit decreasing: `rows`, unit by unit (`_units`), into micro-batches of cost ≤ `budget`; a row
    whose prompt the micro-batch already holds costs its response alone."""
    bins: list[_Bin] = []
    for unit in _units(rows, prompt_len, resp_len, keys):
        for row in unit:
            p, t, key = prompt_len[row], resp_len[row], None if keys is None else keys[row]
            target = next((b for b in bins if b.cost_with(p, t, packing, key) <= budget), None)
            if target is None:
                target = _Bin()
                bins.append(target)
            target.add(row, p, t, key)
    return [b.rows for b in bins]


def _split_to(parts: list[list[int]], count: int, prompt_len, resp_len, packing: bool, keys) -> list[list[int]]:
    """Split the costliest multi-row micro-batch in two (alternate rows) until there are `count`."""
    parts = [list(p) for p in parts]
    while len(parts) < count:
        splittable = [i for i, p in enumerate(parts) if len(p) > 1]
        i = max(splittable, key=lambda j: (_cost(parts[j], prompt_len, resp_len, packing, keys), -j))
        parts[i : i + 1] = [parts[i][0::2], parts[i][1::2]]
    return parts


@dataclass(frozen=True)
class StepPlan:
    """The micro-batches of one step for every rank.

    micro_batches[m][r]: rank r's micro-batches of mini-batch m, each a tuple of batch rows in layout order;
        every rank has the same number of micro-batches in a mini-batch and the same number of rows.
    mini_batch_rows[m]: the rows of mini-batch m (a consecutive block of the batch).
    prompt_len, response_len: per row of the batch, real prompt tokens and response length (host ints).
    packing: whether micro-batches are packed (their cost is Σ tokens) or padded (rows × longest).
    prompt_keys: per row, an id of its prompt (equal ids: identical prompts) when packed micro-batches share
        prompts; None otherwise.
    """

    micro_batches: tuple[tuple[tuple[tuple[int, ...], ...], ...], ...]
    mini_batch_rows: tuple[range, ...]
    prompt_len: tuple[int, ...]
    response_len: tuple[int, ...]
    packing: bool
    prompt_keys: tuple[int, ...] | None = None

    @property
    def num_mini_batches(self) -> int:
        return len(self.micro_batches)

    def for_rank(self, rank: int) -> list[tuple[tuple[int, ...], ...]]:
        """Rank `rank`'s micro-batches, one tuple of row-tuples per mini-batch."""
        return [per_rank[rank] for per_rank in self.micro_batches]

    def rank_rows(self, rank: int) -> list[int]:
        """The rows rank `rank` computes in the whole step, in the order it computes them."""
        return [row for per_rank in self.micro_batches for micro in per_rank[rank] for row in micro]

    def tokens(self, mini_batch: int) -> tuple[int, int]:
        """(real tokens, positions the model computes) of mini-batch `mini_batch` over all ranks. Real tokens
        count each sample's prompt + response; padding makes the second larger, shared prompts smaller."""
        rows = self.mini_batch_rows[mini_batch]
        real = sum(self.prompt_len[i] + self.response_len[i] for i in rows)
        micro = [x for per_rank in self.micro_batches[mini_batch] for x in per_rank]
        keys = self.prompt_keys
        return real, sum(_cost(x, self.prompt_len, self.response_len, self.packing, keys) for x in micro)


def plan_step(
    prompt_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    mini_batch_samples: int,
    micro_batch_tokens: int,
    world_size: int,
    packing: bool = True,
    prompt_keys: Sequence[int] | None = None,
) -> StepPlan:
    """Every rank's micro-batches of every mini-batch (see the module docstring).

    Args:
        prompt_mask: [B, P] bool, True on real prompt tokens (left padding False).
        response_mask: [B, T] bool, True on response tokens (right padding False).
        packing: cost micro-batches as packed rows (Σ tokens) instead of padded ones (rows × longest).
        prompt_keys: per row, an id of its prompt (`prompt_keys_of`): packed micro-batches share each prompt
            among its samples (cost: the prompt once), and the plan keeps its samples together. Packed only.
    """
    if prompt_keys is not None and not packing:
        raise ValueError("shared prompts (prompt_keys) need packed micro-batches (packing=True)")
    num_samples = prompt_mask.shape[0]
    if num_samples % mini_batch_samples:
        raise ValueError(
            f"the batch of {num_samples} samples does not divide into mini-batches of mini_batch_samples="
            f"{mini_batch_samples}"
        )
    if mini_batch_samples % world_size:
        raise ValueError(
            f"mini_batch_samples={mini_batch_samples} does not divide evenly over world_size={world_size} ranks"
        )
    prompt_len = prompt_mask.bool().sum(-1).tolist()
    resp_len = response_lengths(response_mask).tolist()
    keys = None if prompt_keys is None else tuple(int(k) for k in prompt_keys)
    plan, blocks = [], []
    for mb_start in range(0, num_samples, mini_batch_samples):
        block = range(mb_start, mb_start + mini_batch_samples)
        per_rank = [
            _fill(rows, prompt_len, resp_len, micro_batch_tokens, packing, keys)
            for rows in _assign_ranks(block, prompt_len, resp_len, world_size, keys)
        ]
        count = max(len(parts) for parts in per_rank)
        per_rank = [_split_to(parts, count, prompt_len, resp_len, packing, keys) for parts in per_rank]
        plan.append(tuple(tuple(tuple(micro) for micro in parts) for parts in per_rank))
        blocks.append(block)
    return StepPlan(
        micro_batches=tuple(plan),
        mini_batch_rows=tuple(blocks),
        prompt_len=tuple(prompt_len),
        response_len=tuple(resp_len),
        packing=packing,
        prompt_keys=keys,
    )


def prompt_keys_of(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[int]:
    """[B] ids of the rows' prompts: equal for rows whose real prompt tokens are identical (ids numbered in
    order of first appearance). prompt_ids, prompt_mask: [B, P] (left-padded)."""
    real = torch.where(prompt_mask.bool(), prompt_ids, -1)
    seen: dict[tuple[int, ...], int] = {}
    return [seen.setdefault(tuple(row), len(seen)) for row in real.tolist()]


# ----------------------------------------------------------------------------------------------------------
# a micro-batch's tensors


@dataclass(frozen=True)
class MicroBatchInputs:
    """Model inputs of one micro-batch of b samples (integer tensors only, plus host ints).

    input_ids:      packed [1, N] int64, the samples' real tokens [prompt | response] one after another;
                    padded [b, p + t] int64, [left-padded prompt | right-padded response].
    position_ids:   same shape, int64: 0-based positions within each sample.
    attention_mask: padded only: [b, p + t] int64, 1 on real tokens; None when packed.
    cu_seq_lens:    packed only: [s + 1] int32, segment boundaries in the row (0, then running sums); a
                    segment is one sample, or with shared prompts one prompt and the responses after it.
    target_index:   [M] int64, flat positions (into input_ids.view(-1)) whose outputs predict the M response
                    tokens (one per real response position of every sample, in row-major order).
    target_ids:     [M] int64, those response tokens.
    response_index: [M] int64, flat positions of those tokens in the micro-batch's [b, t] response layout.
    rows:           the samples' rows of the step's batch, in layout order.
    seq_lens:       packed only: tokens per segment (host ints); () when padded.
    shared:         with shared prompts: per segment, (prompt tokens, tokens of each response after it)
                    (host ints); () otherwise.
    attn_query_index, attn_key_index, attn_visible, attn_output_index: with shared prompts, the fields of
                    the layout's learner.attention.AttentionRows (tensors, so they travel with the inputs);
                    None otherwise.
    response_len:   t, the width of the [b, t] response layout (the micro-batch's longest response, ≥ 1).
    num_tokens:     real tokens, each sample's prompt + response; computed_tokens: positions the model computes
                    (= num_tokens when packed, fewer with shared prompts, b × (p + t) when padded).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    cu_seq_lens: torch.Tensor | None
    target_index: torch.Tensor
    target_ids: torch.Tensor
    response_index: torch.Tensor
    rows: tuple[int, ...]
    seq_lens: tuple[int, ...]
    response_len: int
    num_tokens: int
    computed_tokens: int
    shared: tuple[tuple[int, tuple[int, ...]], ...] = ()
    attn_query_index: torch.Tensor | None = None
    attn_key_index: torch.Tensor | None = None
    attn_visible: torch.Tensor | None = None
    attn_output_index: torch.Tensor | None = None

    @property
    def attention_rows(self) -> AttentionRows | None:
        """The shared-prompt attention rows (None without shared prompts)."""
        if self.attn_query_index is None:
            return None
        return AttentionRows(self.attn_query_index, self.attn_key_index, self.attn_visible, self.attn_output_index)

    @property
    def packed(self) -> bool:
        return self.attention_mask is None


@dataclass(frozen=True)
class MicroBatchLossInputs:
    """Per-token loss inputs of a micro-batch in its [b, t] response layout (t = MicroBatchInputs.response_len).

    loss_mask: [b, t] bool, True on tokens in the loss. old_log_probs, advantages: [b, t] float32.
    ref_log_probs: [b, t] float32 or None (only with a KL term). num_loss_tokens: loss_mask.sum(), host int.
    """

    loss_mask: torch.Tensor
    old_log_probs: torch.Tensor
    advantages: torch.Tensor
    ref_log_probs: torch.Tensor | None
    num_loss_tokens: int


def micro_batch_inputs(
    batch: RolloutBatch, rows: Sequence[int], *, packing: bool = True, share_prompts: bool = False
) -> MicroBatchInputs:
    """The model inputs of the samples `rows` of `batch` (host tensors; see MicroBatchInputs).

    Packing needs every sample to have at least one prompt token (the first response token is predicted from
    the sample's own last prompt token, never from the previous sample). `share_prompts` (packed only):
    consecutive rows with identical prompts share one copy of it (`_shared_prompt_inputs`)."""
    index = torch.as_tensor(list(rows), dtype=torch.int64)
    prompt_mask = batch.prompt_mask[index].bool()
    prompt_lens = prompt_mask.sum(-1)
    if packing and bool((prompt_lens == 0).any()):
        raise ValueError("packing needs at least one prompt token per sample (set packing=False otherwise)")
    if share_prompts:
        if not packing:
            raise ValueError("share_prompts needs packing=True")
        return _shared_prompt_inputs(batch, rows)
    p = max(1, int(prompt_lens.max()))
    resp_len = response_lengths(batch.response_mask[index])
    t = max(1, int(resp_len.max()))
    tokens = torch.cat([batch.prompt_ids[index, -p:], batch.response_ids[index, :t]], dim=1)  # [b, p + t]
    response_real = torch.arange(t).unsqueeze(0) < resp_len.unsqueeze(-1)  # [b, t]
    real = torch.cat([prompt_mask[:, -p:], response_real], dim=1)  # [b, p + t]
    positions = (real.cumsum(-1) - 1).clamp(min=0)
    # flat position of every (sample, column) in the model's input, so position − 1 predicts the token there
    flat = (real.flatten().cumsum(0) - 1).view_as(real) if packing else torch.arange(real.numel()).view_as(real)
    sample, column = response_real.nonzero(as_tuple=True)
    seq_lens = real.sum(-1)
    num_tokens = int(seq_lens.sum())
    common = dict(
        target_index=flat[sample, p + column] - 1,
        target_ids=tokens[sample, p + column],
        response_index=sample * t + column,
        rows=tuple(int(r) for r in rows),
        response_len=t,
        num_tokens=num_tokens,
    )
    if packing:
        return MicroBatchInputs(
            input_ids=tokens[real].unsqueeze(0),
            position_ids=positions[real].unsqueeze(0),
            attention_mask=None,
            cu_seq_lens=torch.cat([torch.zeros(1, dtype=torch.int64), seq_lens.cumsum(0)]).to(torch.int32),
            seq_lens=tuple(seq_lens.tolist()),
            computed_tokens=num_tokens,
            **common,
        )
    return MicroBatchInputs(
        input_ids=tokens,
        position_ids=positions,
        attention_mask=real.long(),
        cu_seq_lens=None,
        seq_lens=(),
        computed_tokens=real.numel(),
        **common,
    )


def _shared_prompt_inputs(batch: RolloutBatch, rows: Sequence[int]) -> MicroBatchInputs:
    """Packed inputs with one segment per run of consecutive rows that have identical prompts:
    [prompt (P tokens, positions 0..P-1) | response 1 (positions P..) | response 2 (positions P..) | ...]. The
    first token of every response is predicted by the prompt's last position, the others by the position
    before them in the same response (learner/attention.py lets a response see its prompt and itself only)."""
    rows = [int(r) for r in rows]
    resp_len = response_lengths(batch.response_mask[rows]).tolist()
    t = max(1, *resp_len)
    prompts = [batch.prompt_ids[r][batch.prompt_mask[r].bool()] for r in rows]  # non-empty: checked by the caller
    ids, positions, target_index, target_ids, response_index = [], [], [], [], []
    seq_lens, shared = [], []
    offset, i = 0, 0
    while i < len(rows):
        prompt, j = prompts[i], i + 1
        while j < len(rows) and torch.equal(prompts[j], prompt):
            j += 1
        p, last_prompt = len(prompt), offset + len(prompt) - 1
        ids.append(prompt)
        positions.append(torch.arange(p))
        offset += p
        for sample in range(i, j):
            n = resp_len[sample]
            response = batch.response_ids[rows[sample], :n]
            ids.append(response)
            positions.append(torch.arange(p, p + n))
            # column c > 0 is predicted by column c − 1, column 0 by the prompt's last position
            predictors = offset - 1 + torch.arange(n)
            predictors[:1] = last_prompt
            target_index.append(predictors)
            target_ids.append(response)
            response_index.append(sample * t + torch.arange(n))
            offset += n
        seq_lens.append(p + sum(resp_len[i:j]))
        shared.append((p, tuple(resp_len[i:j])))
        i = j
    cu = torch.tensor([0, *seq_lens], dtype=torch.int64).cumsum(0).to(torch.int32)
    rows_of_attention = shared_prompt_rows(shared)
    return MicroBatchInputs(
        input_ids=torch.cat(ids).unsqueeze(0),
        position_ids=torch.cat(positions).unsqueeze(0),
        attention_mask=None,
        cu_seq_lens=cu,
        target_index=torch.cat(target_index),
        target_ids=torch.cat(target_ids),
        response_index=torch.cat(response_index),
        rows=tuple(rows),
        seq_lens=tuple(seq_lens),
        response_len=t,
        num_tokens=sum(len(prompt) for prompt in prompts) + sum(resp_len),
        computed_tokens=offset,
        shared=tuple(shared),
        attn_query_index=rows_of_attention.query_index,
        attn_key_index=rows_of_attention.key_index,
        attn_visible=rows_of_attention.visible,
        attn_output_index=rows_of_attention.output_index,
    )


def micro_batch_loss_inputs(batch: RolloutBatch, mask: torch.Tensor, inputs: MicroBatchInputs) -> MicroBatchLossInputs:
    """The loss inputs of `inputs`' samples (host tensors), cut to its response width. `mask` = loss_mask(batch)."""
    index = torch.as_tensor(inputs.rows, dtype=torch.int64)
    t = inputs.response_len
    mb_mask = mask[index, :t]
    return MicroBatchLossInputs(
        loss_mask=mb_mask,
        old_log_probs=batch.old_log_probs[index, :t],
        advantages=batch.advantages[index, :t],
        ref_log_probs=None if batch.ref_log_probs is None else batch.ref_log_probs[index, :t],
        num_loss_tokens=int(mb_mask.sum()),
    )


def to_device(items: list, device: torch.device) -> list:
    """`items` (dataclasses, or tensors) with every tensor (field) on `device`, copied with one transfer per
    dtype (from pinned memory, non-blocking, on CUDA); views of those transfers replace the tensors. On the
    CPU: unchanged."""
    if device.type == "cpu":
        return items
    slots = []  # (item index, field name or None for a bare tensor, tensor)
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            slots.append((i, None, item))
            continue
        for f in dataclasses.fields(item):
            if isinstance(value := getattr(item, f.name), torch.Tensor):
                slots.append((i, f.name, value))
    moved: list[dict] = [{} for _ in items]
    for dtype in {value.dtype for _, _, value in slots}:
        group = [(i, name, value) for i, name, value in slots if value.dtype == dtype]
        flat = torch.cat([value.reshape(-1) for _, _, value in group]).pin_memory()
        flat = flat.to(device, non_blocking=True)
        for (i, name, value), part in zip(group, flat.split([v.numel() for _, _, v in group])):
            moved[i][name] = part.view(value.shape)
    return [
        changes[None] if isinstance(item, torch.Tensor) else dataclasses.replace(item, **changes)
        for item, changes in zip(items, moved)
    ]
