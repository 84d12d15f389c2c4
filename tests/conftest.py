"""Hypothesis profiles: 'ci' (default, keeps the suite to a few minutes on 2 cores),
'thorough' (more examples, for a long local run). Pick with HYPOTHESIS_PROFILE."""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile(
    "thorough", max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
