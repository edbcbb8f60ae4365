"""Start-up checks of what would otherwise fail an hour into a run, each error naming the config key.

`preflight(cfg)` runs before anything expensive (model build, warm-start, Ray): the output folder is writable,
its disk holds the checkpoints the run keeps, and a configured model path exists here. `check_shared` runs
once the actors' resources are placed: on a cluster of several nodes, every node that holds a learner rank
must see the driver's `trainer.output_dir` (the ranks write one checkpoint there together) and every node of
an engine or a learner rank the model directory (each loads it on its own node).
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from pathlib import Path

from orchestration.config import TrainConf
from orchestration.sizes import ConfigError

FLOAT32_BYTES = 4
OPTIMIZER_COPIES = 3
"""The learner state per parameter: float32 master weight and AdamW's two moments."""


def model_params(cfg: TrainConf) -> tuple[int, int] | None:
    """(parameters, bytes per parameter of the model's own dtype), approximately, or None when the model is
    not a local directory (a hub id: its size is not known before it is downloaded)."""
    m = cfg.model
    if m.path is None:  # the tiny model, from its config: embeddings and LM head + attention and MLP per layer
        from rollout.tiny import VOCAB_SIZE

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


def preflight(cfg: TrainConf) -> None:
    """Raise ConfigError, naming the key, for an output folder that is not writable or whose disk is too small
    for the configured checkpoints, a model.path that does not exist here (unless it is a hub id), or
    cluster.rollout_cpus naming cores this machine does not have."""
    if cfg.cluster.rollout_cpus is not None and cfg.cluster.address is None:  # the workers run here
        from orchestration.placement import resolve_cpus

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
    needed = disk_needed(cfg)
    free = shutil.disk_usage(out).free
    if needed is not None and needed > free:
        raise ConfigError(
            f"trainer.output_dir / trainer.keep_checkpoints / trainer.save_every: the run's checkpoints need about "
            f"{needed / 1e9:.1f} GB (each ≈ 3 × parameters × 4 B of learner state + the HF export), but {out} "
            f"has {free / 1e9:.1f} GB free"
        )


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

    from actors import on_node

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
