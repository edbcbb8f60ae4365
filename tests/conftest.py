"""Test-wide environment: offline hub, offline wandb, in-process vLLM engine, Ray without token auth
(orchestration/env.py), and the hypothesis profile."""

import os

from hypothesis import settings

from orchestration.env import use_local_defaults

use_local_defaults()

# Property tests explore new random cases locally; under CI they replay a fixed set, so a green CI run is
# reproducible (set HYPOTHESIS_PROFILE=dev to explore under CI too).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
