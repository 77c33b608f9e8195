import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Bounded example counts keep CI fast; `HYPOTHESIS_PROFILE=thorough` for local digging.
# CI draws the same examples every run (derandomize): a statistical property ("within
# the noise") must not fail a build by the luck of a draw; "thorough" draws afresh.
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Real-executor tests: the copy thread needs a core; torch's own pool on a busy
    2-core machine made them up to 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
