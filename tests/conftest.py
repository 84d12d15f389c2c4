"""Hypothesis profiles: 'ci' (default: a few minutes on 2 cores, derandomized so a run
is reproducible and CI cannot fail by the luck of the draw), 'thorough' (10x the
examples, random, for exploring locally). Pick with HYPOTHESIS_PROFILE."""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True,
    derandomize=True,
)
settings.register_profile(
    "thorough", max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
