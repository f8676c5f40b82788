"""Does the demo dataset show a real domain shift? Leave-one-style-out with a small CNN on CPU.

    python -m data_prep.domain_shift [--cache /tmp/rsc_demo_cache] [--epochs 8] [--targets sketch,photo,...]

For each target style: train a small CNN on the train split of the other three styles, then report
its accuracy on their held-out val split (in-domain) and on every image of the target style
(out-of-domain). A large gap means the styles change what a network can rely on. Plain torch, no
Accelerate; shards are read through the real manifest (load_manifest) and the trainer's decode call.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from data_prep.demo import ensure_demo_shards
from data_prep.images import SHARD_IMAGE_EXTENSIONS, decode_rgb
from data_prep.manifest import Manifest, load_manifest
from data_prep.tarshard import iter_tar_samples


def load_split(manifest: Manifest, domain: str, splits: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for split in splits:
        for path in manifest.shard_paths(domain, split):
            for sample in iter_tar_samples(path):
                extension = next(e for e in SHARD_IMAGE_EXTENSIONS if e in sample)
                images.append(decode_rgb(sample[extension]))
                labels.append(int(sample["cls"]))
    return torch.stack(images).float().div_(255), torch.tensor(labels)


def small_cnn(num_classes: int) -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.MaxPool2d(2))

    return nn.Sequential(block(3, 16), block(16, 32), block(32, 64), block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))


def augment(images: torch.Tensor) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 4 px (reflect-padded crop)."""
    flip = torch.rand(images.shape[0]) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    padded = nn.functional.pad(images, (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2,))
    return padded[:, :, dy:dy + images.shape[2], dx:dx + images.shape[3]]


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch_size: int = 64) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * -(-len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(images)).split(batch_size):
            loss = nn.functional.cross_entropy(model(augment(images[batch])), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(256)])
    return (predictions == labels).float().mean().item()


def leave_one_out(manifest: Manifest, target: str, *, epochs: int, seed: int) -> dict:
    sources = [d for d in manifest.domains if d != target]
    train_parts = [load_split(manifest, d, ("train",)) for d in sources]
    val_parts = [load_split(manifest, d, ("val",)) for d in sources]
    target_images, target_labels = load_split(manifest, target, ("train", "val", "test"))
    torch.manual_seed(seed)
    model = small_cnn(manifest.num_classes)
    started = time.perf_counter()
    train(model, torch.cat([p[0] for p in train_parts]), torch.cat([p[1] for p in train_parts]), epochs=epochs)
    return {"target": target, "train_images": sum(len(p[1]) for p in train_parts),
            "in_domain": accuracy(model, torch.cat([p[0] for p in val_parts]), torch.cat([p[1] for p in val_parts])),
            "val_images": sum(len(p[1]) for p in val_parts),
            "target_acc": accuracy(model, target_images, target_labels), "target_images": len(target_labels),
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="/tmp/rsc_demo_cache")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--targets", default="sketch,photo,cartoon,painting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manifest = load_manifest(ensure_demo_shards(Path(args.cache)))
    print(f"demo shards: {manifest.root}; small CNN, {args.epochs} epochs, seed {args.seed}, {args.threads} threads")
    print("| held-out style | train images | in-domain val acc (3 styles) | target-style acc | drop | train s |")
    print("|---|---|---|---|---|---|")
    for target in args.targets.split(","):
        r = leave_one_out(manifest, target, epochs=args.epochs, seed=args.seed)
        print(f"| {r['target']} | {r['train_images']} | {r['in_domain']:.1%} (n={r['val_images']}) | "
              f"{r['target_acc']:.1%} (n={r['target_images']}) | {r['in_domain'] - r['target_acc']:+.1%} | "
              f"{r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
