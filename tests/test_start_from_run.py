"""model.pretrained from this project's own runs (the pre-train -> fine-tune recipe): a run folder,
best/, checkpoint_STEP/ (safetensors or torch files), the backbone always and the head only
when its classes fit; torchvision-layout files still load as before. (A DeepSpeed checkpoint
folder: tests/test_averaging_train.py, which has one; a whole fine-tuning run there too.)"""

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from rsc_dist.core.errors import ConfigError
from rsc_dist.models.build import build_model
from rsc_dist.models.weights import weights_fingerprint


def saved_network(folder, classes=6, arch="resnet18", seed=3, name="model.safetensors"):
    torch.manual_seed(seed)
    network = build_model(arch, classes)
    state = {k: v.contiguous() for k, v in network.state_dict().items()}
    state["method.critic.weight"] = torch.ones(2, 2)  # a method's own module: never loaded
    folder.mkdir(parents=True, exist_ok=True)
    if name.endswith(".safetensors"):
        save_file(state, str(folder / name))
    else:
        torch.save(state, folder / name)
    return network.state_dict()


def same(a, b, prefix):
    keys = [k for k in a if k.startswith(prefix)]
    return bool(keys) and all(torch.equal(a[k], b[k]) for k in keys)


def test_a_run_folder_gives_backbone_and_head_when_the_classes_fit(tmp_path):
    source = saved_network(tmp_path / "run" / "checkpoints" / "best")
    torch.manual_seed(0)
    network = build_model("resnet18", 6, pretrained=str(tmp_path / "run"))
    assert same(network.state_dict(), source, "features.") and same(network.state_dict(), source, "head.")
    assert network.loaded_from == f"backbone and head from {tmp_path / 'run'}"


@pytest.mark.parametrize("where, name", [("checkpoints/best", "model.safetensors"),
                                         ("checkpoints/checkpoint_00000004", "pytorch_model.bin"),
                                         ("weights", "anything.pt")])
def test_other_classes_keep_the_backbone_and_start_a_new_head(tmp_path, where, name):
    source = saved_network(tmp_path / where, name=name)
    path = tmp_path / where / name if name.endswith(".pt") else tmp_path / where
    torch.manual_seed(0)
    fresh = build_model("resnet18", 4).state_dict()
    torch.manual_seed(0)
    network = build_model("resnet18", 4, pretrained=str(path))
    state = network.state_dict()
    assert same(state, source, "features.")
    assert state["head.fc.weight"].shape == (4, 512) and torch.equal(state["head.fc.weight"], fresh["head.fc.weight"])
    assert "head initialized afresh for 4 classes" in network.loaded_from


def test_torchvision_layout_files_load_as_before(tmp_path):
    torch.manual_seed(5)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    network = build_model("resnet18", 4, pretrained=str(tmp_path / "resnet18.pth"))
    assert torch.equal(network.features[0].weight, reference.conv1.weight) and network.loaded_from is None


def test_weights_that_do_not_fit_are_refused_naming_them(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no weights in this folder"):
        build_model("resnet18", 4, pretrained=str(tmp_path / "empty"))
    saved_network(tmp_path / "r34" / "checkpoints" / "best", arch="resnet34")
    with pytest.raises(ConfigError, match="its backbone does not fit this model.arch .* e.g. features"):
        build_model("resnet18", 4, pretrained=str(tmp_path / "r34"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="cannot read weights from .*bad/model.safetensors"):
        build_model("resnet18", 4, pretrained=str(tmp_path / "bad"))


def test_the_initial_weights_fingerprint_tells_starts_apart():
    def start(seed):
        torch.manual_seed(seed)
        return weights_fingerprint(build_model("resnet18", 4).state_dict())

    assert start(0) == start(0) and start(0) != start(1)
