"""bench/soak.py's measurements and goals, without a run: the summary of hand-made samples, /proc readings of this
process, file counts."""

import mmap
import os

import psutil

from bench.soak import MB, count_files, rss_by_mapping, summarize


def _sample(step: int, procs: dict, store_mb: float, files: dict | None = None) -> dict:
    return {
        "kind": "end",
        "staleness": 0,
        "step": step,
        "step_s": 2.0,
        "sample_s": 0.1,
        "procs": procs,
        "store": {"used": store_mb * MB, "objects": 1, "probe_s": 0.01},
        "files": {"session": 80, "session_bytes": 0, "output": 20, "output_bytes": 0, "tmp": 5, "tmp_top": {}}
        | (files or {}),
        "driver": {"refs": 0, "pushed_weights": 0},
    }


def _proc(rss_mb: float, fds: int = 50) -> dict:
    return {"rss": int(rss_mb * MB), "uss": int(rss_mb * MB), "fds": fds, "threads": 10, "pid": 1}


def test_summary_names_what_grows_after_warm_up_and_nothing_else():
    """Over 40 steps (warm-up 10): the engine's RSS grows 20% after warm-up; the learner grows 30% before warm-up
    only, then holds; the driver gains 4 fds; the object store swings between 0 and 4 MiB at step ends (a bucket
    freed late), without drifting."""
    samples = []
    for step in range(40):
        procs = {
            "driver": _proc(500, fds=50 + (4 if step >= 30 else 0)),
            "engine0": _proc(1500 + 10 * max(0, step - 9)),  # +300 MiB after warm-up
            "learner0": _proc(600 if step >= 5 else 460),
        }
        samples.append(_sample(step, procs, store_mb=4.0 * (step % 2)))
    r = summarize(samples, staleness=0, warmup=10)
    assert r["steps"] == 40
    engine = r["processes"]["engine0"]
    assert engine["rss_mb"] == 1500 and engine["rss_end_mb"] == 1800 and engine["rss_growth_pct"] == 20.0
    assert r["processes"]["learner0"]["rss_growth_pct"] == 0.0
    goals = r["goals"]
    assert goals["rss_over_10pct"] == {"engine0": 20.0} and not goals["rss_within_10pct"]
    assert goals["fds_grown"] == {"driver": (50, 54)} and not goals["fds_steady"]
    assert goals["store_at_baseline"] and r["store"]["drift_mb"] == 0.0
    assert goals["files_steady"]


def test_summary_flags_a_drifting_object_store_and_accumulating_files():
    samples = [
        _sample(step, {"driver": _proc(500)}, store_mb=4.0 + 0.5 * step, files={"session": 80 + step})
        for step in range(30)
    ]
    r = summarize(samples, staleness=0, warmup=10)
    assert not r["goals"]["store_at_baseline"] and r["store"]["drift_mb"] > 1
    assert not r["goals"]["files_steady"] and r["files"]["session"] == (89, 109)


def test_summary_of_a_run_shorter_than_warm_up_says_so():
    r = summarize([_sample(0, {"driver": _proc(500)}, 0.0)], staleness=0, warmup=10)
    assert "error" in r and r["steps"] == 1


def test_rss_by_mapping_adds_up_to_rss_and_sees_a_big_buffer_once_touched():
    def total() -> int:
        return sum(rss_by_mapping(os.getpid()).values())

    assert abs(total() - psutil.Process().memory_info().rss) < 0.05 * psutil.Process().memory_info().rss
    before, big_before = total(), rss_by_mapping(os.getpid())["big"]
    # a new anonymous mapping (mmap itself: a malloc of this size may be served from free heap left by earlier
    # tests in this process), resident only once written
    buffer = mmap.mmap(-1, 96 * MB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer[::4096] = b"\1" * len(range(0, len(buffer), 4096))
    assert 90 * MB <= total() - before <= 110 * MB
    # the kernel may merge the new mapping with an adjacent anonymous one: "big" grows by at least the buffer
    assert rss_by_mapping(os.getpid())["big"] - big_before >= 90 * MB
    buffer.close()


def test_count_files_leaves_out_the_skipped_tree(tmp_path):
    (tmp_path / "checkpoints" / "step_1").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_1" / "model.bin").write_bytes(b"x" * 10)
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "run.wandb").write_bytes(b"y" * 3)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert count_files(tmp_path) == (3, 16)
    assert count_files(tmp_path, skip=(tmp_path / "checkpoints",)) == (2, 6)
