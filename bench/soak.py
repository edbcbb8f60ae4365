"""Soak benchmark (issue 34 part 4): does a long run of the demo hold its memory, file handles and temp files?

    python -m bench.soak [--steps 300] [--staleness 0 1] [--warmup 20] [--interval 0.5] [--out outputs/soak]
                         [--tmp-every 10] [--no-warm-start] [--no-probe] [--tracemalloc] [OVERRIDE ...]

Trains the demo's setting (conf/config.yaml: FIPO on the built-in task, the tiny model after its cached
warm-start, 16 prompts × 8 samples per step, evaluation and checkpoint every 10 steps, offline wandb) for
`--steps` steps, once per `--staleness` value (trainer.max_staleness), one run after the other, in this process
(orchestration.train.train, as `make demo` runs it). The warm-start is trained once and cached
(outputs/models/warm_start, ~7 min alone on 2 cores, ~20 min beside other work); `--no-warm-start` skips it with
`model.warm_start_steps=0 algorithm.filter_groups=false` (a random model never answers right, so dynamic
sampling would drop every group and stop after algorithm.max_gen_rounds: without the filter every step trains on
its one generation round of 64-token responses), a different workload from the demo's.

While a run trains, a thread samples every `--interval` seconds, and the loop's metrics logger (hooked) samples
once more at the end of every step:

* every process of the run: the driver, each rollout engine, learner rank, reward scorer actor and its scorer
  child process (reward/pool.py), the advantage actor (pids from the run's layout, run_info.json's `layout`;
  children found with psutil), and the rest of the driver's process tree (Ray's gcs_server, raylet and agents,
  wandb's service; Ray's other worker processes summed as `ray:workers`): RSS, USS (/proc/PID/smaps_rollup),
  open file descriptors (/proc/PID/fd), threads;
* Ray's object store: bytes in use, objects, primary copies, fallback and spilled bytes (the raylet's
  FormatGlobalMemoryInfo, the numbers `ray memory --stats-only` prints), and the driver's Ray object refs
  (core worker reference table) and `run.pushed_weights`;
* files: the Ray session directory (logs, sockets), the run's output directory without checkpoints/ (pruned to
  trainer.keep_checkpoints), and /tmp (the whole machine's, other sessions' files included: the summary names the
  top-level entries that grew; walked every `--tmp-every` steps, which takes ~1 s on a busy machine);
* RSS by kind of mapping (/proc/PID/smaps) of the run's own processes: glibc's main heap, big anonymous
  mappings (vLLM's KV cache), other anonymous memory, files.

The loop's thread reads only the object store and the driver's refs at a step's end; the sampling thread reads
the rest right after (`Soak`), so the loop is held up by ~10 ms a step, not by the ~0.3 s the reads take.

Samples go to `<out>/soak_samples.jsonl` as they are taken (nothing accumulates in this process), curves to
`<out>/soak.png`, the runs' own folders to `<out>/staleness<k>/`. Goals (issue 34), per run, from the end of step
`--warmup` (20) to the end: no process of the run's own (driver, engines, learner ranks, scorers and their
children, advantage actor; Ray's and wandb's processes are reported beside them) grows its RSS more than 10% (max
over the last 10% of steps against the value after `--warmup` steps); the object store at each step's end stays
at its baseline (step-end values swing between a few levels as a weight bucket is freed just after its step:
the highest value of the last 10% of steps, at least 5, may exceed that of the first as many after warm-up by
1 MiB or 10%; the median, max excess over it and peak within a step are reported); no process's file
descriptors grow by more than 2 and no files accumulate in the session or output directory.

To name what grows, every actor and the driver are probed (`actor.__ray_call__`, queued behind the actor's current
call) a step before the end of warm-up, a step before the midpoint and at the end: RSS, gc-tracked Python objects
by type, live torch tensors and their bytes, and at the end the RSS left after glibc's malloc_trim(0) (memory the
allocator holds freed: a drop there is retention, not live objects); `--no-probe` skips it. `--tracemalloc` also
traces the driver's allocations by line (slower). One JSON line last.
"""

from __future__ import annotations

from orchestration.cluster.env import use_local_defaults

use_local_defaults()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402

from bench.common import device_info, git_commit, print_result  # noqa: E402

MB = 2**20
RSS_GOAL = 0.10  # a process may grow at most 10% after warm-up
FD_SLACK = 2  # descriptors a process may gain after warm-up (a lazily opened log, a socket)
FILE_SLACK = 2  # files the session / output directory may gain after warm-up
SYSTEM = (  # driver descendants that are not the run's actors: (marker in name or command line, label)
    ("gcs_server", "ray:gcs_server"),
    ("raylet", "ray:raylet"),
    ("log_monitor", "ray:log_monitor"),
    ("dashboard/agent", "ray:dashboard_agent"),
    ("runtime_env/agent", "ray:runtime_env_agent"),
    ("dashboard.py", "ray:dashboard"),
    ("monitor.py", "ray:monitor"),
    ("wandb", "wandb"),
)

SYSTEM_PREFIXES = ("ray:", "other:", "wandb")  # labels of processes that are not the run's own


# ---------------------------------------------------------------------------------------------- sampling


def actor_pids(run: Any) -> dict[str, int]:
    """{label: pid} of the run's actors: engines and learner ranks as they are now (a restarted one has a new
    pid), scorers and the advantage actor as the layout recorded them at start-up."""
    layout = run.layout_info
    pids = {f"scorer{e['index']}": e["pid"] for e in layout.get("reward", [])}
    pids["advantage"] = layout["advantage"][0]["pid"]
    pids |= {f"engine{i}": info["pid"] for i, info in enumerate(run.rollout.worker_info)}
    pids |= {f"learner{i}": where["pid"] for i, where in enumerate(run.learner.locations)}
    return pids


def system_label(proc: psutil.Process) -> str:
    """The label of a driver descendant that is no actor of the run (module constant SYSTEM)."""
    try:
        cmd = proc.cmdline()
        name = proc.name()
    except psutil.Error:
        return "gone"
    if cmd and cmd[0].startswith("ray::"):
        return "ray:workers"
    text = " ".join([name, *cmd[:4]])
    return next((label for marker, label in SYSTEM if marker in text), f"other:{name}")


def process_table(driver: int, actors: dict[str, int]) -> dict[str, list[int]]:
    """{label: [pids]}: the driver, each actor and its descendants ("<actor>.child", "<actor>.child<k>"), and the
    driver's other descendants by system_label (several pids under one label are summed)."""
    table: dict[str, list[int]] = {"driver": [driver]}
    seen = {driver}
    for label, pid in sorted(actors.items()):
        table[label] = [pid]
        seen.add(pid)
        try:
            children = sorted(p.pid for p in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            children = []
        for k, child in enumerate(children):
            table[f"{label}.child" if len(children) == 1 else f"{label}.child{k}"] = [child]
            seen.add(child)
    try:
        rest = psutil.Process(driver).children(recursive=True)
    except psutil.Error:
        rest = []
    for proc in rest:
        if proc.pid not in seen:
            table.setdefault(system_label(proc), []).append(proc.pid)
    return table


BIG_MAPPING = 64 * MB
"""An anonymous mapping at least this large is one big allocation (vLLM's CPU KV cache, VLLM_CPU_KVCACHE_SPACE:
resident in full from the engine's start)."""


def rss_by_mapping(pid: int) -> dict[str, int]:
    """Resident bytes of `pid` by kind of mapping (/proc/PID/smaps): "heap" (glibc's main arena, brk), "big"
    (anonymous mappings of BIG_MAPPING or more: a preallocated buffer, e.g. vLLM's KV cache), "anon"
    (other anonymous mappings: other arenas, large mallocs, Python's arenas, thread stacks), "file" (libraries)."""
    out = {"heap": 0, "big": 0, "anon": 0, "file": 0}
    kind = "anon"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(maxsplit=6)
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping's header: range perms offset dev inode [path]
                low, high = (int(x, 16) for x in head[0].split("-"))
                path = head[5].strip() if len(head) > 5 else ""
                kind = "heap" if path == "[heap]" else ("file" if path.startswith("/") else "anon")
                if kind == "anon" and not path and high - low >= BIG_MAPPING:
                    kind = "big"
            elif head[0] == "Rss:":
                out[kind] += int(head[1]) * 1024
    return out


def read_process(pid: int, full: bool, mappings: bool = False) -> dict[str, int] | None:
    """RSS (and with `full`: USS, open fds, threads; with `mappings`: rss_by_mapping) of `pid`; None when gone."""
    try:
        proc = psutil.Process(pid)
        if not full:
            return {"rss": proc.memory_info().rss}
        mem = proc.memory_full_info()
        out = {"rss": mem.rss, "uss": mem.uss, "fds": proc.num_fds(), "threads": proc.num_threads()}
        return out | ({f"rss_{k}": v for k, v in rss_by_mapping(pid).items()} if mappings else {})
    except (psutil.Error, OSError):
        return None


def read_processes(table: dict[str, list[int]], full: bool) -> dict[str, dict[str, int]]:
    """{label: {rss, [uss, fds, threads], pid | n}}: one pid's numbers, or the sum over a label's pids (`n` of them)."""
    out: dict[str, dict[str, int]] = {}
    for label, pids in table.items():
        mappings = full and not label.startswith(SYSTEM_PREFIXES)  # the run's own processes
        values = [v for v in (read_process(pid, full, mappings) for pid in pids) if v is not None]
        if not values:
            continue
        total = {key: sum(v[key] for v in values) for key in values[0]}
        out[label] = total | ({"pid": pids[0]} if len(pids) == 1 else {"n": len(values)})
    return out


class StoreProbe:
    """Ray's object store statistics over one gRPC channel to the raylet (what `ray memory --stats-only`
    prints, in bytes: ray._private.internal_api.get_memory_info_reply opens a channel per call)."""

    def __init__(self) -> None:
        import ray
        from ray._common.network_utils import build_address
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import node_manager_pb2, node_manager_pb2_grpc

        node = next(n for n in ray.nodes() if n["Alive"])
        self.channel = init_grpc_channel(build_address(node["NodeManagerAddress"], node["NodeManagerPort"]))
        self.stub = node_manager_pb2_grpc.NodeManagerServiceStub(self.channel)
        self.request = node_manager_pb2.FormatGlobalMemoryInfoRequest(include_memory_info=False)
        self.lock = threading.Lock()

    def read(self) -> dict[str, float] | None:
        try:
            with self.lock:
                start = time.perf_counter()
                s = self.stub.FormatGlobalMemoryInfo(self.request, timeout=10.0).store_stats
        except Exception:  # noqa: BLE001 (Ray going down at the end of a run)
            return None
        return {
            "used": s.object_store_bytes_used,
            "objects": s.num_local_objects,
            "primary": s.object_store_bytes_primary_copy,
            "fallback": s.object_store_bytes_fallback,
            "spilled": s.spilled_bytes_total,
            "probe_s": round(time.perf_counter() - start, 4),
        }

    def close(self) -> None:
        self.channel.close()


def count_files(root: Path, skip: tuple[Path, ...] = ()) -> tuple[int, int]:
    """(files, bytes) under `root` (recursively, not following links), leaving out the trees `skip`."""
    files = size = 0
    stack = [root]
    skipped = {str(p) for p in skip}
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            if entry.path in skipped:
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                else:
                    files += 1
                    size += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return files, size


def tmp_files() -> dict[str, int]:
    """{top-level entry of /tmp: files under it (1 for a plain file)}, the whole machine's /tmp."""
    out = {}
    try:
        entries = list(os.scandir("/tmp"))
    except OSError:
        return out
    for entry in entries:
        try:
            out[entry.name] = count_files(Path(entry.path))[0] if entry.is_dir(follow_symlinks=False) else 1
        except OSError:
            continue
    return out


def driver_refs() -> int:
    """Object refs in this process's Ray reference table (owned or borrowed, in scope)."""
    import ray

    try:
        return len(ray._private.worker.global_worker.core_worker.get_all_reference_counts())
    except Exception:  # noqa: BLE001
        return -1


def session_dir() -> Path | None:
    import ray

    try:
        return Path(ray._private.worker._global_node.get_session_dir_path())
    except Exception:  # noqa: BLE001
        return None


def process_memory(_actor: Any = None, trim: bool = False) -> dict:
    """Inside a process (an actor through `__ray_call__`, or the driver): RSS, its gc-tracked Python objects by
    type, the live torch tensors (count, bytes of their distinct storages) and, with `trim`, the RSS after glibc's
    malloc_trim(0) (what the allocator holds freed but not returned to the system). Objects frozen by gc.freeze()
    (vLLM freezes everything it built at start) are invisible to gc.get_objects(): only their count is given."""
    import ctypes
    import sys

    torch = sys.modules.get("torch")  # not imported here where the process has not (it would add ~200 MB)
    gc.collect()
    objects = gc.get_objects()
    types = Counter(type(o).__qualname__ for o in objects)
    storages: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [o for o in objects if torch is not None and isinstance(o, torch.Tensor)]
    for o in tensors:
        try:
            storage = o.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            continue
    del objects, tensors
    out = {
        "rss": psutil.Process().memory_info().rss,
        "types": dict(types),
        "tensors": types.get("Tensor", 0) + types.get("Parameter", 0),
        "tensor_bytes": sum(storages.values()),
        "frozen": gc.get_freeze_count(),  # objects frozen by gc.freeze() (vLLM does at start): not counted above
    }
    if trim:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        out["rss_after_trim"] = psutil.Process().memory_info().rss
    return out


def actor_handles(run: Any) -> dict[str, Any]:
    """{label: Ray actor handle} of the run's actors (labels as in process_table)."""
    handles = {f"engine{i}": w for i, w in enumerate(run.rollout.workers)}
    handles |= {f"learner{i}": a for i, a in enumerate(run.learner.actors)}
    handles |= {f"scorer{i}": w for i, w in enumerate(run.reward.workers)}
    handles["advantage"] = run.advantage.worker
    return handles


def probe_actors(run: Any, trim: bool) -> dict[str, dict]:
    """process_memory in the driver and in every actor of the run (queued behind the actor's current call)."""
    import ray

    handles = actor_handles(run)
    refs = {label: h.__ray_call__.remote(process_memory, trim) for label, h in handles.items()}
    out = {"driver": process_memory(None, trim)}
    for label, ref in refs.items():
        try:
            out[label] = ray.get(ref, timeout=120)
        except Exception as err:  # noqa: BLE001 (a diagnosis must not stop the run)
            out[label] = {"error": repr(err)[:200]}
    return out


def probe_growth(before: dict[str, dict], middle: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """Per process, from `before` (a step before the end of warm-up) over `middle` (a step before the midpoint
    after it) to `after` (the end): RSS, live tensors and their bytes, Python objects and the 8 types that grew
    most (each as [before, middle, after]: a leak grows in both halves), and the RSS malloc_trim left at the end."""
    out = {}
    for label, a in after.items():
        b, m = before.get(label, {}), middle.get(label, {})
        if not all("rss" in x for x in (a, b, m)):
            continue
        grown = Counter(a["types"])
        grown.subtract(b["types"])
        points = (b, m, a)
        out[label] = {
            "rss_mb": [round(x["rss"] / MB, 1) for x in points],
            "tensor_mb": [round(x["tensor_bytes"] / MB, 2) for x in points],
            "tensors": [x["tensors"] for x in points],
            "objects": [sum(x["types"].values()) for x in points],
            "frozen_objects": [x.get("frozen", 0) for x in points],
            "object_growth": {k: [x["types"].get(k, 0) for x in points] for k, v in grown.most_common(8) if v > 0},
        } | ({"rss_after_trim_mb": round(a["rss_after_trim"] / MB, 1)} if "rss_after_trim" in a else {})
    return out


class Soak:
    """Samples one run: attached to it once built (`attach`), sampled every `interval` s by a thread and at the
    end of every step (`step_end`, called by the loop's logger); every sample is one line of `sink`.

    At a step's end the loop's thread reads only what must be read then (the object store, the driver's refs,
    ~10 ms) and hands the rest (every process's memory, fds and mappings, the files) to the sampling thread, so
    that the loop is not held up (those reads take ~0.2 s, and walking a busy machine's /tmp ~1 s: /tmp is walked
    every `tmp_every` steps, after warm-up and at the end). The last step's sample is awaited: the run's actors
    are shut down right after it."""

    def __init__(
        self, sink, staleness: int, interval: float, warmup: int, trace: bool, probe: bool, tmp_every: int
    ) -> None:
        self.sink, self.staleness, self.interval, self.warmup, self.trace = sink, staleness, interval, warmup, trace
        self.tmp_every = tmp_every
        self.run: Any = None
        self.store: StoreProbe | None = None
        self.session: Path | None = None
        self.table: dict[str, list[int]] = {}
        self.step = 0  # the step in progress (polls are tagged with it)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.ends: queue.Queue = queue.Queue()  # step-end records for the thread to complete
        self.thread = threading.Thread(target=self._loop, name="soak-sampler", daemon=True)
        self.started = time.monotonic()
        self.probe = probe
        self.probes: list[dict] = []  # probe_actors after warm-up and at the midpoint
        self.trace_at_warmup: Any = None
        self.diagnosis: dict[str, Any] = {}

    def attach(self, run: Any) -> None:
        self.run, self.store, self.session = run, StoreProbe(), session_dir()
        self._refresh()
        start = self._record("start") | {"store": self.store.read(), "driver": self._driver()}
        self._write(self._complete(start, tmp=True))
        self.thread.start()

    def _refresh(self) -> None:
        table = process_table(os.getpid(), actor_pids(self.run))
        with self.lock:
            self.table = table

    def _write(self, record: dict) -> None:
        with self.lock:
            self.sink.write(json.dumps(record, separators=(",", ":")) + "\n")
            self.sink.flush()

    def _record(self, kind: str) -> dict:
        return {"kind": kind, "staleness": self.staleness, "step": self.step,
                "t": round(time.monotonic() - self.started, 2)}  # fmt: skip

    def _driver(self) -> dict:
        return {"refs": driver_refs(), "pushed_weights": len(self.run.pushed_weights)}

    def _complete(self, record: dict, tmp: bool) -> dict:
        """A step-end (or start) record with every process's numbers and the files (and /tmp with `tmp`)."""
        start = time.perf_counter()
        self._refresh()  # a restarted actor or scorer child has a new pid
        with self.lock:
            table = dict(self.table)
        out = Path(self.run.cfg.trainer.output_dir)
        session = count_files(self.session) if self.session else (0, 0)
        output = count_files(out, skip=(out / "checkpoints",))
        record["procs"] = read_processes(table, full=True)
        record["files"] = {"session": session[0], "session_bytes": session[1], "output": output[0],
                           "output_bytes": output[1]}  # fmt: skip
        if tmp:
            top = tmp_files()
            record["files"] |= {"tmp": sum(top.values()), "tmp_top": top}
        record["sample_s"] = round(time.perf_counter() - start, 3)  # this sample's own cost, off the loop's thread
        return record

    def _loop(self) -> None:
        while not (self.stop.is_set() and self.ends.empty()):
            try:
                record, tmp = self.ends.get(timeout=self.interval)
            except queue.Empty:
                if self.run is not None and not self.stop.is_set():
                    with self.lock:
                        table = dict(self.table)
                    poll = self._record("poll") | {"procs": read_processes(table, full=False)}
                    self._write(poll | {"store": self.store.read() if self.store else None})
                continue
            try:
                record = self._complete(record, tmp)
            except Exception as err:  # noqa: BLE001 (the thread must live on: the last step waits for it)
                record["error"] = repr(err)[:300]
            finally:
                self._write(record)
                self.ends.task_done()

    def step_end(self, step: int, metrics: dict) -> None:
        """The loop logged step `step`: read the object store and the driver's refs now, the rest in the thread
        (awaited at the last step); probe the actors a step before the end of warm-up and of the midpoint, and at
        the end (module docstring)."""
        total = self.run.cfg.trainer.total_steps
        record = self._record("end") | {"step": step, "step_s": metrics.get("timing_s/step")}
        record |= {"store": self.store.read(), "driver": self._driver()}
        with self.lock:
            self.step = step + 1
        tmp = (step + 1) % self.tmp_every == 0 or step + 1 in (self.warmup, total)
        self.ends.put((record, tmp))
        if step + 1 == total:
            self.ends.join()
        if self.probe and step + 2 in (self.warmup, (self.warmup + total) // 2):  # a step before the sample it
            # would disturb (the reference after warm-up, the midpoint's)
            self.ends.join()
            self.probes.append(probe_actors(self.run, trim=False))
        if step + 1 == self.warmup:
            if self.trace:
                import tracemalloc

                self.trace_at_warmup = tracemalloc.take_snapshot()
        elif step + 1 == total:
            if self.probe and len(self.probes) == 2:
                self.diagnosis["memory_probe"] = probe_growth(*self.probes, probe_actors(self.run, trim=True))
                self.probes = []
            if self.trace and self.trace_at_warmup is not None:
                import tracemalloc

                diff = tracemalloc.take_snapshot().compare_to(self.trace_at_warmup, "lineno")
                self.diagnosis["driver_alloc_growth"] = [str(d) for d in diff[:15]]
                self.trace_at_warmup = None

    def detach(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        if self.store is not None:
            self.store.close()
        self.run = self.store = None


def run_soak(staleness: int, args: argparse.Namespace, sink) -> dict:
    """Train one run with trainer.max_staleness=`staleness`, sampled by a Soak; its wall time and diagnosis."""
    import orchestration.train as loop
    from tools.demo import compose_config

    out = Path(args.out) / f"staleness{staleness}"
    shutil.rmtree(out, ignore_errors=True)
    extra = ["model.warm_start_steps=0", "algorithm.filter_groups=false"] if args.no_warm_start else []
    cfg = compose_config([
        *extra, *args.overrides, f"trainer.max_staleness={staleness}", f"trainer.total_steps={args.steps}",
        f"trainer.output_dir={out}",
    ])  # fmt: skip
    soak = Soak(sink, staleness, args.interval, args.warmup, args.tracemalloc, not args.no_probe, args.tmp_every)
    build_run, logger_cls = loop.build_run, loop.MetricsLogger

    def build_and_attach(cfg: Any) -> Any:
        run = build_run(cfg)
        soak.attach(run)
        return run

    class SampledLogger(logger_cls):
        def log(self, step: int, metrics: dict) -> None:
            super().log(step, metrics)
            soak.step_end(step, metrics)

    loop.build_run, loop.MetricsLogger = build_and_attach, SampledLogger
    start = time.perf_counter()
    try:
        loop.train(cfg)
    finally:
        loop.build_run, loop.MetricsLogger = build_run, logger_cls
        soak.detach()
    return {"wall_s": round(time.perf_counter() - start, 1), "output_dir": str(out), **soak.diagnosis}


# ---------------------------------------------------------------------------------------------- analysis


def read_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tail(values: list, frac: float = 0.1) -> list:
    return values[-max(1, round(len(values) * frac)) :]


def mapping_growth(start: dict, end: dict) -> dict:
    """{"mappings_mb": {kind: [after warm-up, end]}} of a process sampled with rss_by_mapping, else {}."""
    kinds = [k for k in ("heap", "big", "anon", "file") if f"rss_{k}" in start and f"rss_{k}" in end]
    if not kinds:
        return {}
    return {"mappings_mb": {k: [round(start[f"rss_{k}"] / MB, 1), round(end[f"rss_{k}"] / MB, 1)] for k in kinds}}


def summarize(samples: list[dict], staleness: int, warmup: int) -> dict:
    """The goals' numbers for one run (module docstring) from its step-end samples and polls."""
    ends = sorted((s for s in samples if s["kind"] == "end" and s["staleness"] == staleness and "procs" in s),
                  key=lambda s: s["step"])  # fmt: skip
    polls = [s for s in samples if s["kind"] == "poll" and s["staleness"] == staleness]
    if len(ends) <= warmup:
        return {"steps": len(ends), "error": f"fewer than --warmup={warmup} steps: no goal measured"}
    ref, after = ends[warmup - 1], ends[warmup - 1 :]
    tail = _tail(ends[warmup:])
    peak_rss: dict[str, int] = {}  # per label, the highest RSS of any poll after warm-up
    for s in polls:
        if s["step"] >= warmup:
            for label, p in s["procs"].items():
                peak_rss[label] = max(peak_rss.get(label, 0), p["rss"])
    processes = {}
    for label, p0 in ref["procs"].items():
        end_rss = [s["procs"][label]["rss"] for s in tail if label in s["procs"]]
        end_uss = [s["procs"][label]["uss"] for s in tail if label in s["procs"]]
        end_fds = [s["procs"][label]["fds"] for s in tail if label in s["procs"]]
        if not end_rss:
            processes[label] = {"gone": True}
            continue
        pids = {s["procs"][label].get("pid") for s in after if label in s["procs"]}
        processes[label] = (
            {
                "rss_mb": round(p0["rss"] / MB, 1),
                "rss_end_mb": round(max(end_rss) / MB, 1),
                "rss_growth_pct": round(100 * (max(end_rss) / p0["rss"] - 1), 1),
                "uss_growth_pct": round(100 * (max(end_uss) / max(p0["uss"], 1) - 1), 1),
                "rss_peak_mb": round(peak_rss.get(label, 0) / MB, 1),
                "fds": p0["fds"],
                "fds_end": max(end_fds),
                "threads": p0["threads"],
                "threads_end": tail[-1]["procs"].get(label, {}).get("threads"),
            }
            | mapping_growth(p0, tail[-1]["procs"].get(label, {}))
            | ({"pids": len(pids)} if len(pids) > 1 else {})
            | ({"n": p0["n"]} if "n" in p0 else {})
        )
    store_end = [s["store"]["used"] for s in ends if s.get("store")]
    store_after = [s["store"]["used"] for s in after if s.get("store")]
    baseline = statistics.median(store_after)
    # step-end values swing between a few levels (a pushed weight bucket is freed a moment after its step ends):
    # compare the highest of the first and of the last window of steps after warm-up, each of 10% (at least 5)
    window = max(5, round(0.1 * len(store_after)))
    first_window, last_window = max(store_after[:window]), max(store_after[-window:])
    store_peak = max((s["store"]["used"] for s in polls if s.get("store") and s["step"] >= warmup), default=0)
    probe = [s["store"]["probe_s"] for s in samples if s.get("store") and s["staleness"] == staleness]
    files = {key: (ref["files"][key], max(s["files"][key] for s in tail)) for key in ("session", "output")}
    tmp_walks = [s for s in after if "tmp" in s["files"]]  # /tmp is walked every --tmp-every steps
    if len(tmp_walks) >= 2:
        first, last = tmp_walks[0]["files"], tmp_walks[-1]["files"]
        files["tmp"] = (first["tmp"], last["tmp"])
        tmp_grown = {name: (first["tmp_top"].get(name, 0), n) for name, n in last["tmp_top"].items()
                     if n > first["tmp_top"].get(name, 0)}  # fmt: skip
    else:
        tmp_grown = {}
    new = sorted({label for s in tail for label in s["procs"]} - set(ref["procs"]))
    # the goal is the run's own processes' (issue 34: driver, engines, learner ranks, scorers, advantage actor);
    # Ray's and wandb's processes are reported beside them
    named = [label for label in processes if not label.startswith(SYSTEM_PREFIXES)]
    grown = {label: processes[label]["rss_growth_pct"] for label in named if not processes[label].get("gone")
             and processes[label]["rss_growth_pct"] > 100 * RSS_GOAL}  # fmt: skip
    fd_grown = {label: (p["fds"], p["fds_end"]) for label, p in processes.items() if not p.get("gone")
                and p["fds_end"] > p["fds"] + FD_SLACK}  # fmt: skip
    store_drift = last_window - first_window
    return {
        "steps": len(ends),
        "seconds_per_step": round(statistics.median(s["step_s"] for s in ends if s.get("step_s")), 2),
        "step_end_sample_s": round(statistics.median(s.get("sample_s", 0) for s in ends), 3),  # the bench's cost
        "processes": processes,
        "store": {
            "baseline_mb": round(baseline / MB, 2),
            "first_window_max_mb": round(first_window / MB, 2),
            "last_window_max_mb": round(last_window / MB, 2),
            "max_excess_mb": round((max(store_after) - baseline) / MB, 2),
            "drift_mb": round(store_drift / MB, 2),
            "peak_poll_mb": round(store_peak / MB, 2),
            "step_end_mb": [round(v / MB, 2) for v in store_end],
            "objects_at_warmup": ref["store"]["objects"],
            "objects_end": tail[-1]["store"]["objects"],
            "probe_s_median": round(statistics.median(probe), 4) if probe else None,
        },
        "driver_refs": (ref["driver"]["refs"], tail[-1]["driver"]["refs"]),
        "pushed_weights": (ref["driver"]["pushed_weights"], tail[-1]["driver"]["pushed_weights"]),
        "files": files,
        "session_bytes_mb": (
            round(ref["files"]["session_bytes"] / MB, 2),
            round(tail[-1]["files"]["session_bytes"] / MB, 2),
        ),  # fmt: skip
        "output_bytes_mb": (
            round(ref["files"]["output_bytes"] / MB, 2),
            round(tail[-1]["files"]["output_bytes"] / MB, 2),
        ),  # fmt: skip
        "tmp_grown": tmp_grown,
        "new_processes": new,  # labels seen at the end and not after warm-up (a restarted child, a new worker)
        "total_fds": (
            sum(p["fds"] for p in ref["procs"].values()),
            sum(p["fds"] for p in tail[-1]["procs"].values()),
        ),  # fmt: skip
        "goals": {
            "rss_within_10pct": not grown,
            "rss_over_10pct": grown,
            "store_at_baseline": store_drift <= max(MB, 0.1 * first_window),
            "fds_steady": not fd_grown,
            "fds_grown": fd_grown,
            "files_steady": all(end <= start + FILE_SLACK for key, (start, end) in files.items() if key != "tmp"),
        },
    }


def plot(samples: list[dict], staleness_values: list[int], path: Path, warmup: int) -> Path:
    """Nine panels over steps (step-end samples; line style = staleness, colour = process): RSS of the run's
    processes, of Ray's and other processes, every process's RSS relative to the end of warm-up, open fds per
    process, the object store at step ends and its peak within each step, files, the driver's Ray object refs and
    the store's object count, seconds per step, and the RSS by mapping kind of the process that grew most."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(19, 14), constrained_layout=True)
    styles = {s: ls for s, ls in zip(staleness_values, ("-", "--", ":", "-."))}
    colors = list(plt.cm.tab20.colors) + list(plt.cm.tab20b.colors)
    color_of: dict[str, Any] = {}
    for s in staleness_values:
        ends = sorted((x for x in samples if x["kind"] == "end" and x["staleness"] == s and "procs" in x),
                      key=lambda x: x["step"])  # fmt: skip
        if not ends:
            continue
        steps = [x["step"] + 1 for x in ends]
        ref = ends[min(warmup, len(ends)) - 1]["procs"]
        for label in sorted({label for x in ends for label in x["procs"]}):
            system = label.startswith(SYSTEM_PREFIXES)
            color = color_of.setdefault(label, colors[len(color_of) % len(colors)])
            name = label if s == staleness_values[0] else None  # one legend entry per process
            xs = [st for st, x in zip(steps, ends) if label in x["procs"]]
            rss = [x["procs"][label]["rss"] / MB for x in ends if label in x["procs"]]
            axes[0, 1 if system else 0].plot(xs, rss, styles[s], color=color, lw=1.1, label=name)
            if label in ref:
                rel = [100 * (r * MB / ref[label]["rss"] - 1) for r in rss]
                axes[0, 2].plot(xs, rel, styles[s], color=color, lw=1.0, label=name)
            fds = [x["procs"][label]["fds"] for x in ends if label in x["procs"]]
            axes[1, 0].plot(xs, fds, styles[s], color=color, lw=1.0, label=name)
        store = [x["store"]["used"] / MB if x.get("store") else float("nan") for x in ends]
        axes[1, 1].plot(steps, store, styles[s], color="C0", label=f"step end (staleness {s})")
        peaks: dict[int, float] = {}
        for x in samples:
            if x["kind"] == "poll" and x["staleness"] == s and x.get("store") and x["step"] < len(ends):
                peaks[x["step"] + 1] = max(peaks.get(x["step"] + 1, 0.0), x["store"]["used"] / MB)
        axes[1, 1].plot(sorted(peaks), [peaks[k] for k in sorted(peaks)], styles[s], color="C3", lw=0.8,
                        label=f"peak within the step (staleness {s})")  # fmt: skip
        for key, color in (("session", "C0"), ("output", "C1"), ("tmp", "C2")):
            points = [(st, x["files"][key]) for st, x in zip(steps, ends) if key in x["files"]]
            axes[1, 2].plot([p[0] for p in points], [p[1] for p in points], styles[s], color=color,
                            marker="." if key == "tmp" else None, label=f"{key} (staleness {s})")  # fmt: skip
        axes[2, 0].plot(steps, [x["driver"]["refs"] for x in ends], styles[s], color="C4",
                        label=f"driver's object refs (staleness {s})")  # fmt: skip
        axes[2, 0].plot(steps, [x["store"]["objects"] if x.get("store") else float("nan") for x in ends],
                        styles[s], color="C5", label=f"objects in the store (staleness {s})")  # fmt: skip
        axes[2, 1].plot(steps, [x.get("step_s") or float("nan") for x in ends], styles[s], color="C0",
                        label=f"staleness {s}")  # fmt: skip
        grown = max((label for label in ref if "rss_heap" in ref[label] and label in ends[-1]["procs"]),
                    key=lambda label: ends[-1]["procs"][label]["rss"] - ref[label]["rss"], default=None)  # fmt: skip
        for kind, color in (("heap", "C0"), ("big", "C1"), ("anon", "C2"), ("file", "C7")) if grown else ():
            ys = [x["procs"][grown].get(f"rss_{kind}", float("nan")) / MB if grown in x["procs"] else float("nan")
                  for x in ends]  # fmt: skip
            axes[2, 2].plot(steps, ys, styles[s], color=color, label=f"{grown} {kind} (staleness {s})")
    titles = [
        "RSS of the run's processes (MiB)", "RSS of Ray's and other processes (MiB)",
        "RSS change since the end of warm-up (%)", "open file descriptors per process",
        "Ray object store in use (MiB)", "files: Ray session dir, output dir (no checkpoints), /tmp (all)",
        "driver's Ray object refs; objects in the store", "seconds per step",
        "RSS by mapping of the process that grew most (MiB)",
    ]  # fmt: skip
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.axvline(warmup, color="grey", lw=0.6, ls=":")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2 if ax in (axes[0, 2], axes[1, 0]) else 1)
    axes[0, 2].axhline(100 * RSS_GOAL, color="red", lw=0.6)
    axes[1, 2].set_yscale("log")
    fig.suptitle(
        f"soak: trainer.max_staleness {' / '.join(map(str, staleness_values))} (line styles: solid, dashed); "
        f"dotted: end of warm-up ({warmup} steps); red: the +10% RSS goal"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def report(name: str, r: dict) -> None:
    """Print one run's numbers."""
    if "error" in r:
        print(f"{name}: {r['error']}", flush=True)
        return
    print(f"\n{name}: {r['steps']} steps, {r['seconds_per_step']} s/step (the step-end sample took "
          f"{r['step_end_sample_s']} s)", flush=True)  # fmt: skip
    print(f"  {'process':26s} {'RSS MiB':>8s} {'end MiB':>8s} {'growth':>7s} {'USS gr.':>7s} {'peak':>7s} "
          f"{'fds':>4s} {'end':>4s} {'thr':>4s} {'end':>4s}")  # fmt: skip
    for label, p in r["processes"].items():
        if p.get("gone"):
            print(f"  {label:26s} gone")
            continue
        print(f"  {label:26s} {p['rss_mb']:8.1f} {p['rss_end_mb']:8.1f} {p['rss_growth_pct']:6.1f}% "
              f"{p['uss_growth_pct']:6.1f}% {p['rss_peak_mb']:7.1f} {p['fds']:4d} {p['fds_end']:4d} "
              f"{p['threads']:4d} {p['threads_end'] or 0:4d}" + (f"  ({p['n']} procs)" if "n" in p else "")
              + (f"  ({p['pids']} pids)" if "pids" in p else ""))  # fmt: skip
        if "mappings_mb" in p and p["rss_growth_pct"] > 2:
            print("    RSS by mapping: " + ", ".join(f"{k} {a} → {b} MiB" for k, (a, b) in p["mappings_mb"].items()))
    st = r["store"]
    print(f"  object store at step ends: median {st['baseline_mb']} MiB, max excess over it {st['max_excess_mb']} MiB; "
          f"highest in the first / last window {st['first_window_max_mb']} / {st['last_window_max_mb']} MiB (drift "
          f"{st['drift_mb']}); peak within a step {st['peak_poll_mb']} MiB; objects {st['objects_at_warmup']} → "
          f"{st['objects_end']}")  # fmt: skip
    print(f"  driver object refs {r['driver_refs'][0]} → {r['driver_refs'][1]}, pushed_weights "
          f"{r['pushed_weights'][0]} → {r['pushed_weights'][1]}, all processes' fds {r['total_fds'][0]} → "
          f"{r['total_fds'][1]}")  # fmt: skip
    print("  files after warm-up → end: " + ", ".join(f"{k} {a} → {b}" for k, (a, b) in r["files"].items())
          + f"; session {r['session_bytes_mb'][0]} → {r['session_bytes_mb'][1]} MiB, output "
          f"{r['output_bytes_mb'][0]} → {r['output_bytes_mb'][1]} MiB")  # fmt: skip
    if r["new_processes"]:
        print(f"  processes that appeared after warm-up: {r['new_processes']}")
    if r["tmp_grown"]:
        print(f"  /tmp entries that grew (whole machine): {r['tmp_grown']}")
    for label, g in r.get("memory_probe", {}).items():
        trim = f", after malloc_trim {g['rss_after_trim_mb']}" if "rss_after_trim_mb" in g else ""
        print(f"  probe {label:10s} RSS {g['rss_mb']} MiB{trim}; tensors {g['tensors']} ({g['tensor_mb']} MiB); "
              f"Python objects {g['objects']}, grown most: {g['object_growth']}")  # fmt: skip
    if r.get("driver_alloc_growth"):
        print("  driver allocations grown (tracemalloc):\n    " + "\n    ".join(r["driver_alloc_growth"]))
    g = r["goals"]
    print(f"  goals: RSS ≤ +10% {'met' if g['rss_within_10pct'] else 'MISSED ' + str(g['rss_over_10pct'])}; "
          f"object store at baseline {'met' if g['store_at_baseline'] else 'MISSED'}; "
          f"fds {'steady' if g['fds_steady'] else 'GROWN ' + str(g['fds_grown'])}; "
          f"files {'steady' if g['files_steady'] else 'GROWN'}", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="training steps per run")
    p.add_argument("--staleness", type=int, nargs="+", default=[0, 1], help="trainer.max_staleness of each run")
    p.add_argument("--warmup", type=int, default=20, help="steps before the goals are measured")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between background samples")
    p.add_argument("--out", default="outputs/soak", help="folder of soak.png, soak_samples.jsonl and the runs")
    p.add_argument("--no-warm-start", action="store_true",
                   help="model.warm_start_steps=0 algorithm.filter_groups=false (module docstring)")  # fmt: skip
    p.add_argument("--tmp-every", type=int, default=10, help="steps between walks of /tmp (slow on a busy machine)")
    p.add_argument("--tracemalloc", action="store_true", help="trace the driver's allocations (slower)")
    p.add_argument("--no-probe", action="store_true", help="no object counts inside the actors (module docstring)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides added to every run")
    args = p.parse_args()
    if args.steps <= args.warmup:
        p.error(f"--steps must exceed --warmup ({args.warmup})")
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(10)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples_path = out / "soak_samples.jsonl"
    runs = {}
    with samples_path.open("w") as sink:
        for staleness in args.staleness:
            runs[staleness] = run_soak(staleness, args, sink)
            print(f"staleness {staleness}: {args.steps} steps in {runs[staleness]['wall_s']} s", flush=True)
    samples = read_samples(samples_path)
    results = {}
    for staleness in args.staleness:
        results[staleness] = summarize(samples, staleness, args.warmup) | runs[staleness]
        report(f"staleness {staleness}", results[staleness])
    png = plot(samples, args.staleness, out / "soak.png", args.warmup)
    print(f"\ncurves: {png}; samples: {samples_path}", flush=True)
    for r in results.values():
        r.get("store", {}).pop("step_end_mb", None) if args.steps > 60 else None  # the JSONL holds them
    goals = {s: r.get("goals", {}) for s, r in results.items()}
    met = all(g.get(k) for g in goals.values() for k in ("rss_within_10pct", "store_at_baseline", "fds_steady",
                                                          "files_steady"))  # fmt: skip
    print_result({"bench": "soak", "commit": git_commit(), **device_info(), "steps": args.steps,
                  "staleness": args.staleness, "warmup": args.warmup, "interval_s": args.interval,
                  "no_warm_start": args.no_warm_start, "overrides": args.overrides, "goals_met": met,
                  "png": str(png), "samples": str(samples_path), "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
