"""The benchmark's variants compute the same step; its CLI prints a table."""

import pytest
import torch

from rsc_dist import bench


def test_variants_compute_the_same_logits():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 64, 64)
    y = torch.randint(0, 7, (6,))
    outputs = {}
    for name in bench.VARIANTS:
        model = bench.make_variant(name, "resnet18", 7).double().train()
        for module in model.modules():  # frozen BN: variants then see identical statistics
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
        outputs[name] = model(x.double(), y, mode="channel", p_batch=0.5)
    rsc_variants = [v for v in bench.VARIANTS if v != "erm"]
    for name in rsc_variants[1:]:
        torch.testing.assert_close(outputs[name], outputs[rsc_variants[0]], msg=name)
    assert not torch.allclose(outputs["erm"], outputs[rsc_variants[0]])  # RSC masked something


def test_cli_prints_table(capsys, tmp_path):
    results = bench.main(
        ["--arch", "resnet18,timm/test_vit", "--resolution", "32", "--batch", "4", "--rounds", "1", "--steps", "1",
         "--warmup", "0", "--device", "cpu", "--json", str(tmp_path / "out.json")]
    )
    out = capsys.readouterr().out
    assert "| resnet18 | 32 | 4 | rsc_closed_form |" in out and "| timm/test_vit | 32 | 4 | rsc_autograd |" in out
    assert set(results[0]["variants"]) == set(bench.VARIANTS)
    # The released code's mask logic reads NCHW maps only: not run on a ViT's tokens.
    assert set(results[1]["variants"]) == set(bench.VARIANTS) - {"rsc_released_logic"}
    assert all(v["img_s"] > 0 for v in results[0]["variants"].values())
    assert (tmp_path / "out.json").exists()


def test_input_benchmark_runs_on_shards(capsys, tiny_shards):
    from rsc_dist import bench_input

    out = bench_input.main(["--shards", str(tiny_shards), "--steps", "2", "--workers", "1",
                            "--data.batch_size=4", "--data.image_size=32"])
    assert set(out["rates"]) == {"loader only", "train, from shards", "train, synthetic in memory"}
    assert all(rate > 0 for rate in out["rates"].values()) and out["fed_fraction"] > 0
    assert "fed fraction" in capsys.readouterr().out


def test_loader_start_times_only_the_start_methods_asked_for(capsys, tiny_shards):
    from rsc_dist import bench_input

    out = bench_input.main(["--shards", str(tiny_shards), "--steps", "2", "--workers", "1", "--loader-start", "1",
                            "--start-methods", "forkserver,fork", "--data.batch_size=4", "--data.image_size=32"])
    assert [row["method"] for row in out["loader_start"]] == ["fork", "forkserver"]
    assert all(row["whole"] >= row["first"] > 0 for row in out["loader_start"])
    assert "server start" in out["loader_start"][1] and "(spawn)" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        bench_input.main(["--loader-start", "1", "--start-methods", "fork,clone"])
    assert stopped.value.code == 2 and "'fork,clone': expected some of fork, forkserver, spawn" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        bench_input.main(["--start-methods", "spawn"])
    assert stopped.value.code == 2 and "--start-methods applies to --loader-start N only" in capsys.readouterr().err


def test_method_benchmark_times_any_registered_method(capsys, tmp_path):
    """A method with state and an optimizer reset (IRM) and one with its own parameters and a
    second update per step (the tests' toy_adversary) run their train_step through the Runner
    and get a ratio to ERM, which is always timed first; an unknown name is one line."""
    from rsc_dist import bench_methods

    result = bench_methods.main(["--methods", "irm,toy_adversary", "--resolution", "32", "--per-domain", "2",
                                 "--rounds", "1", "--steps", "1", "--warmup", "1", "--device", "cpu",
                                 "--freeze-bn", "--json", str(tmp_path / "methods.json")])
    assert list(result["methods"]) == ["erm", "irm", "toy_adversary"]
    assert all(row["img_s"] > 0 and row["step_time_vs_erm"] > 0 for row in result["methods"].values())
    assert result["methods"]["erm"]["step_time_vs_erm"] == 1.0
    assert "| irm |" in capsys.readouterr().out and (tmp_path / "methods.json").exists()
    with pytest.raises(SystemExit) as stopped:
        bench_methods.parse_args(["--methods", "irm,nonesuch"])
    assert stopped.value.code == 2 and "unknown --methods ['nonesuch']" in capsys.readouterr().err
