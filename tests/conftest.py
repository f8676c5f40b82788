import sys, os; sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_wandb_session():
    """End the test's W&B session: W&B reads its environment once per process, so a session
    left open would make the next test's WANDB_* variables (mode, config and cache folders) be
    ignored."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and hasattr(wandb, "teardown"):
        wandb.teardown()
