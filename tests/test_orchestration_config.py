"""The Hydra config tree composes for every preset, matches the published recipes, and rejects bad values."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from orchestration.config.errors import ConfigError
from orchestration.config.schema import TrainConf, register_configs, to_object

CONF = str(Path(__file__).resolve().parents[1] / "conf")
register_configs()


def load(*overrides: str) -> TrainConf:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return to_object(compose("config", overrides=list(overrides)))


def test_embedded_default_is_fipo_tiny_local_cpu():
    cfg = load()
    assert (cfg.algorithm.policy_loss, cfg.model.path, cfg.cluster.name) == ("fipo", None, "local_cpu")
    assert cfg.algorithm.train_batch_prompts // cfg.algorithm.mini_batch_prompts >= 2
    assert cfg.learner.world_size == 2 and cfg.rollout.engine == "vllm" and cfg.logger.wandb_mode == "offline"


@pytest.mark.parametrize(
    "experiment,loss,group,train,gen,mini,max_len,high_only,safety",
    [
        ("fipo_32b", "fipo", 16, 512, 2048, 64, 20480, True, 10.0),
        ("dapo_32b", "dapo", 16, 512, 1536, 32, 20480, True, 10.0),
        ("fipo_7b", "fipo", 32, 512, 2048, 64, 10240, False, 3.0),
        ("dapo_7b", "dapo", 16, 512, 1536, 32, 8192, True, 10.0),
    ],
)
def test_official_recipes(experiment, loss, group, train, gen, mini, max_len, high_only, safety):
    """Values from FIPO_SPEC §5.1 / §5.2."""
    cfg = load(f"experiment={experiment}")
    a = cfg.algorithm
    assert (a.policy_loss, a.group_size, a.train_batch_prompts, a.gen_batch_prompts, a.mini_batch_prompts) == (
        loss,
        group,
        train,
        gen,
        mini,
    )
    assert cfg.rollout.max_response_tokens == max_len
    assert (a.clip_low, a.clip_high, a.clip_c, a.loss_agg_mode, a.kl_coef) == (0.2, 0.28, 10.0, "token-mean", 0.0)
    assert (cfg.learner.lr, cfg.learner.weight_decay, cfg.learner.grad_clip, cfg.learner.warmup_steps) == (
        1e-6,
        0.1,
        1.0,
        10,
    )
    assert cfg.learner.param_dtype == "bfloat16" and cfg.cluster.address == "auto"
    if loss == "fipo":
        assert (a.decay_rate, a.weight_clip, a.weight_clip_high_only, a.safety_threshold) == (
            32.0,
            0.2,
            high_only,
            safety,
        )
    assert cfg.trainer.eval_samples == 32 and cfg.data.max_prompt_tokens == 2048


def test_grpo_preset():
    a = load("algorithm=grpo").algorithm
    assert (a.policy_loss, a.clip_high, a.clip_c, a.loss_agg_mode, a.kl_coef, a.filter_groups) == (
        "grpo",
        0.2,
        None,
        "seq-mean-token-mean",
        0.001,
        False,
    )


def test_unknown_key_is_rejected_not_ignored():
    with pytest.raises(ConfigCompositionException, match="algorithm.typo"):
        load("algorithm.typo=1")


@pytest.mark.parametrize(
    "override,match",
    [
        ("trainer.resume=maybe", "trainer.resume"),
        ("algorithm.max_gen_rounds=0", "algorithm.max_gen_rounds"),
        ("algorithm.clip_c=null", "algorithm.clip_c"),
        ("rollout.engine=tgi", "rollout.engine"),
        ("learner.world_size=9", "cluster.num_cpus"),
        ("algorithm.overlong_buffer_tokens=100", "algorithm.overlong_buffer_tokens"),
        ("cluster.learner_nice=20", "cluster.learner_nice"),
    ],
)
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load(override)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["rollout.weight_transfer=nccl"], r"rollout\.weight_transfer: nccl moves weights between GPUs.*use gloo"),
        (["rollout.weight_transfer=gloo", "trainer.max_staleness=1"], r"rollout\.weight_transfer: gloo with trainer"),
        (
            ["rollout.weight_transfer=gloo", "rollout.engine=hf", "trainer.max_staleness=0"],
            r"needs rollout\.engine=vllm",
        ),
        (["rollout.weight_transfer=ipc"], r"rollout\.weight_transfer.*must be one of"),
    ],
)
def test_a_weight_transfer_this_run_cannot_use_is_refused_at_start_up(overrides, match):
    """A GPU transport on CPU engines, a transport without the object store's copy where a restarted engine
    needs it, a transport the hf engine lacks, a vLLM transport not wired here: each a ConfigError naming the
    key before anything starts."""
    with pytest.raises(ConfigError, match=match):
        load(*overrides)
    assert load("rollout.weight_transfer=gloo", "trainer.max_staleness=0").rollout.weight_transfer == "gloo"


def test_gpu_placement_checked_against_this_machine():
    with pytest.raises(ConfigError, match="GPUs"):
        load("learner.num_gpus_per_rank=1")


def test_missing_files_and_model_name_the_key(tmp_path, monkeypatch):
    from orchestration.inputs import load_prompt_rows, prepare_model

    cfg = load(f"data.train_files=[{tmp_path}/nope.jsonl]")
    with pytest.raises(ConfigError, match=r"data.train_files: file\(s\) not found: .*nope.jsonl"):
        load_prompt_rows(cfg)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load(f"model.path={tmp_path}/no_such_model")
    with pytest.raises(ConfigError, match="model.path: .*no_such_model.* hub is offline"):
        prepare_model(cfg)


def _numeric_keys():
    import dataclasses
    import typing

    from orchestration.config import schema

    hints = typing.get_type_hints(schema.TrainConf)
    for section, cls in hints.items():
        if not dataclasses.is_dataclass(cls):
            continue
        for name, kind in typing.get_type_hints(cls).items():
            if kind in (int, float, int | None, float | None):
                yield f"{section}.{name}"


@pytest.mark.parametrize("key", sorted(_numeric_keys()))
def test_every_numeric_key_rejects_a_negative_value_naming_itself(key):
    """Every key is validated where it is declared (issue: `learner.lr=-1` once passed start-up and failed
    minutes later as "OptimizerConfig.lr"); the error names the key the user typed."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(f"{key}=-1")


@pytest.mark.parametrize(
    "key",
    ["algorithm.policy_loss", "algorithm.advantage_estimator", "algorithm.loss_agg_mode", "algorithm.kl_estimator",
     "rollout.engine", "rollout.dtype", "learner.lr_schedule", "learner.param_dtype", "trainer.resume",
     "logger.wandb_mode", "rollout.weight_transfer"],
)  # fmt: skip
def test_every_choice_key_rejects_an_unknown_choice(key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*must be one of"):
        load(f"{key}=bogus")


def test_component_configs_are_built_before_anything_expensive():
    from orchestration.config.components import check_config

    with pytest.raises(ConfigError, match="reward.fn: .*no_such_module"):
        check_config(load("reward.fn=no_such_module:score"))
    sizes = check_config(load())
    assert sizes.mini_batches_per_step == 2


def test_train_rejects_a_bad_value_in_seconds_before_building_anything(tmp_path):
    """`python -m orchestration.train learner.lr=-1` in a fresh shell: the key in the error, nothing built."""
    import os
    import subprocess
    import sys
    import time

    root = Path(CONF).parent
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "orchestration.train", "learner.lr=-1", f"trainer.output_dir={out}",
           f"model.tiny_dir={tmp_path / 'tiny'}", f"model.warm_start_dir={tmp_path / 'ws'}"]  # fmt: skip
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=root, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0 and time.monotonic() - start < 60
    assert result.stderr.strip().splitlines()[-1] == "error: learner.lr: must be > 0, got -1.0"
    assert "Traceback" not in result.stderr and "File " not in result.stderr, "the message alone, no traceback"
    assert not (tmp_path / "tiny").exists() and not (tmp_path / "ws").exists()
    assert not (out / "checkpoints").exists() and not (tmp_path / ".ray").exists()


def test_study_preset_runs_eight_optimizer_steps_per_batch_from_one_shared_start():
    from orchestration.config.components import sizes_from_config

    for algorithm in ("fipo", "dapo"):
        cfg = load("experiment=study_fipo_vs_dapo", f"algorithm={algorithm}", "seed=3")
        assert cfg.algorithm.policy_loss == algorithm and sizes_from_config(cfg).mini_batches_per_step == 8
        assert (cfg.model.init_seed, cfg.data.synthetic_seed, cfg.seed) == (0, 0, 3)
        assert (cfg.data.synthetic_min_steps, cfg.data.synthetic_max_steps, cfg.rollout.max_response_tokens) == (
            10,
            12,
            160,
        )


def test_a_sweep_members_bug_is_printed_at_once_and_a_condition_of_the_run_alone(capsys):
    """Hydra keeps a failed member's exception until the last member has run (hours, in a study): a bug's
    traceback is printed when it happens, naming the member; dynamic sampling that cannot fill a batch, the
    cause of a failed step, is a condition of the run: its message alone."""
    from orchestration.errors import MemberError, clean_exit
    from orchestration.sampling import SamplingError
    from orchestration.steps import PhaseError

    with pytest.raises(ZeroDivisionError), clean_exit(sweep_member=True, member="outputs/sweeps/s/seed=1"):
        _ = 1 / 0
    err = capsys.readouterr().err
    assert err.startswith("error in this sweep member (outputs/sweeps/s/seed=1); the sweep goes on with the next:\n")
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith("ZeroDivisionError: division by zero")
    message = "step 40: phase 'rollout' failed after 61.0 s: SamplingError: dynamic sampling kept 3 of the 16 groups"
    with pytest.raises(MemberError), clean_exit(sweep_member=True, member="outputs/sweeps/s/seed=1"):
        try:
            raise SamplingError("dynamic sampling kept 3 of the 16 groups")
        except SamplingError as cause:
            raise PhaseError(message, phase="rollout", step=40) from cause
    assert capsys.readouterr().err == f"error: {message}\n"
    with pytest.raises(ZeroDivisionError), clean_exit():  # outside a sweep a bug keeps its traceback, printed once
        _ = 1 / 0
    assert capsys.readouterr().err == ""
