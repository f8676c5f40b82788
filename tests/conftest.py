import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
# The tests' own methods (tests/support/toy_methods.py) are registered in every process of the
# test run, the ranks that accelerate launch starts included; set before rsc_dist is imported.
os.environ["RSC_DIST_METHOD_MODULES"] = "support.toy_methods"
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))

import pytest  # noqa: E402

from support.trainer_fixtures import tiny_shards  # noqa: E402,F401  (a session fixture for every test)


@pytest.fixture(autouse=True)
def fresh_wandb_session():
    """End the test's W&B session: W&B reads its environment once per process, so a session
    left open would make the next test's WANDB_* variables (mode, config and cache folders) be
    ignored."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and hasattr(wandb, "teardown"):
        wandb.teardown()
