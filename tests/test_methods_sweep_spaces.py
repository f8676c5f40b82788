"""The default sweep spaces of Mixup, DANN, CDANN and SagNet are DomainBed's random-search
distributions (domainbed/hparams_registry.py), and every trial they draw is a valid config
(the sweep loader checks each distribution's bounds against the config's types and ranges)."""

import yaml

from rsc_dist.sweep.spec import load_sweep

# field -> (low, high, integer?) of DomainBed's distribution (lr_d: scaled to the preset's lr).
DANN_SPACE = {"adversarial_weight": (1e-2, 1e2, False), "weight_decay_d": (1e-6, 1e-2, False),
              "d_steps_per_g": (1, 7, True), "grad_penalty": (1e-2, 10.0, False), "mlp_width": (64, 1023, True),
              "lr_d": (0.01 / 5, 0.01 * 5, False)}


def test_each_trial_draws_domainbeds_distributions(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"preset": "demo", "methods": ["mixup", "dann", "cdann", "sagnet"],
                                    "targets": ["sketch"], "default_space": True, "n_trials": 40}))
    runs = load_sweep(path).runs
    shared = {"optim.lr", "optim.weight_decay", "data.batch_size"}
    seen = {}
    for run in runs:
        own = {key: value for key, value in run.hparams.items() if key not in shared}
        if run.method == "mixup":
            assert own.keys() == {"mixup.alpha"} and 0.1 <= own["mixup.alpha"] <= 10
        elif run.method == "sagnet":
            assert own.keys() == {"sagnet.adversarial_weight"} and 1e-2 <= own["sagnet.adversarial_weight"] <= 10
        else:
            fields = {key.split(".", 1)[1]: value for key, value in own.items()}
            assert fields.keys() == set(DANN_SPACE) | {"beta1", "mlp_depth", "mlp_dropout"}
            for name, (low, high, integer) in DANN_SPACE.items():
                assert low <= fields[name] <= high and isinstance(fields[name], int) == integer, (name, fields[name])
            assert fields["beta1"] in (0.0, 0.5) and fields["mlp_depth"] in (3, 4, 5)
            assert fields["mlp_dropout"] in (0.0, 0.1, 0.5)
            for name in ("d_steps_per_g", "mlp_depth", "beta1"):
                seen.setdefault(name, set()).add(fields[name])
    assert seen["d_steps_per_g"] >= {1, 2, 3} and seen["mlp_depth"] == {3, 4, 5} and seen["beta1"] == {0.0, 0.5}
