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


@pytest.fixture(scope="session")
def trained_on_one_and_two_ranks(tmp_path_factory):
    """Every method (and the RSC ablations) trained through the trainer's step code on 1
    process and on 2 ranks, in one launch per world size; read by
    test_trainer_step_equivalence.compare_ranks (tests/test_methods.py and
    tests/test_trainer_step_equivalence.py)."""
    from test_trainer_step_equivalence import train_every_variant

    return train_every_variant(tmp_path_factory.mktemp("one_and_two_ranks"))
