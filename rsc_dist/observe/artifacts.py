"""The best model as a W&B artifact (wandb.log_model=best): its weight files and metadata."""

from __future__ import annotations

from pathlib import Path

from rsc_dist.core import selection
from rsc_dist.core.contracts import BEST_RELATIVE, CONFIG_FILE

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def best_model_files(run_dir: Path) -> list[Path]:
    """The model weights in RUN/checkpoints/best (model*.safetensors, pytorch_model*.bin, ...),
    not the optimizer/scheduler/RNG state saved beside them."""
    folder = Path(run_dir) / BEST_RELATIVE
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                  and p.name.startswith(("model", "pytorch_model")))


def best_model_artifact(run, results: dict, run_dir: Path):
    """A wandb.Artifact of type "model" with the best weights, metadata = the best evaluation."""
    import wandb

    files = best_model_files(run_dir)
    if not files:
        return None
    best = results.get("best") or {}
    metadata = {"step": best.get("step"), "val_acc": best.get("val_acc"),
                "target_acc": best.get("target_acc"), "target_top5": best.get("target_top5"),
                "val_per_domain": best.get("val_per_domain"),
                "target_acc_mean": selection.target_mean(best),
                "algorithm": results.get("algorithm"), "dataset": results.get("dataset"),
                "arch": results.get("arch"), "targets": results.get("targets"), "seed": results.get("seed"),
                "fingerprint": results.get("fingerprint")}
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in f"model-{run.id}")
    artifact = wandb.Artifact(safe, type="model", metadata=metadata,
                              description=f"step {best.get('step')} of run {run.name}, chosen by "
                                          f"{results.get('selection')}")
    folder = Path(run_dir) / BEST_RELATIVE
    for path in files:
        artifact.add_file(str(path), name=str(path.relative_to(folder)))
    config_file = Path(run_dir) / CONFIG_FILE
    if config_file.is_file():
        artifact.add_file(str(config_file), name=CONFIG_FILE)
    return artifact
