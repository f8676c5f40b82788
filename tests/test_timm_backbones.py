"""timm backbones (model.arch=timm/<name>): the split into features and head, the weights they
load from local files (timm checkpoints, OpenAI/open_clip CLIP checkpoints, the caches, and the
errors), the torchvision names' decision, RSC on tokens against a plain implementation written
here from docs/method.md, and the config's arch and preprocessing rules.

Models are timm's tiny test models (a few hundred thousand parameters) at 32 px, randomly
initialized; every weights file is written by the test.
"""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

from rsc_dist import train
from rsc_dist.config import load_config
from rsc_dist.core.errors import ConfigError
from rsc_dist.methods import RSC
from rsc_dist.methods.base import MethodContext, StepBatch
from rsc_dist.methods.domain_statistics import pooled_features
from rsc_dist.methods.rsc_masks import CHANGE_MARGIN, _autograd_saliency, rsc_mask, saliency
from rsc_dist.models.build import build_model
from rsc_dist.models.layouts import FeatureLayout
from rsc_dist.models.timm_backbones import switch_off_stochastic_layers
from support.trainer_fixtures import tiny_config

CLASSES, SIZE = 5, 32


def _timm_model(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


# -- the split -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, layout, head_blocks", [
    ("timm/test_vit", FeatureLayout("tokens", 1, (2, 2)), 1),  # class-token head: z is the last block's input
    ("timm/test_vit2", FeatureLayout("tokens", 1, (2, 2)), 0),  # pools the patch tokens
    ("timm/test_convnext", FeatureLayout("nchw"), 0),
    ("timm/test_mambaout", FeatureLayout("nhwc"), 0),
])
def test_split_owns_every_parameter_once_and_computes_timms_logits(arch, layout, head_blocks):
    reference = _timm_model(arch.removeprefix("timm/"), num_classes=CLASSES, img_size=SIZE) \
        if "vit" in arch else _timm_model(arch.removeprefix("timm/"), num_classes=CLASSES)
    # The same initialization (seed 0): the split network is timm's network.
    torch.manual_seed(0)
    net = build_model(arch, CLASSES, image_size=SIZE)
    net.eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    assert net.feature_layout == layout
    assert (net.head.blocks is not None) == bool(head_blocks)
    torch.testing.assert_close(net(x), reference(x), rtol=0, atol=0)
    torch.testing.assert_close(net.head.pooled(net.features(x)),
                               reference.forward_head(reference.forward_features(x), pre_logits=True), rtol=0, atol=0)
    assert net.feature_dim == net.head.pooled(net.features(x)).shape[1]
    keys = list(net.state_dict())
    assert len(keys) == len(set(keys)) and sum(p.numel() for p in net.parameters()) == \
        sum(p.numel() for p in reference.parameters())
    features, head = {id(p) for p in net.features.parameters()}, {id(p) for p in net.head.parameters()}
    assert head and not features & head, "the head owns the parameters forward_head uses, the features the rest"


def test_a_timm_resnet_head_gets_the_closed_form():
    net = build_model("timm/test_resnet", CLASSES, image_size=SIZE)
    assert net.head.closed_form_classifier is net.head.fc
    z, y = net.features(torch.randn(4, 3, SIZE, SIZE)), torch.tensor([0, 1, 2, 4])
    torch.testing.assert_close(saliency(z, net.head, y), _autograd_saliency(z, net.head, y))
    for arch in ("timm/test_convnext", "timm/test_vit2"):  # a norm after the pool: autograd
        assert build_model(arch, CLASSES, image_size=SIZE).head.closed_form_classifier is None


def test_dropout_and_stochastic_depth_are_switched_off():
    """A forward in training mode draws no random number: nothing depends on the rank."""
    model = timm.create_model("test_vit", num_classes=CLASSES, img_size=SIZE, drop_rate=0.2, drop_path_rate=0.2,
                              attn_drop_rate=0.1, proj_drop_rate=0.1)
    switched = switch_off_stochastic_layers(model)
    assert any("drop_path" in path for path in switched) and any("attn_drop" in path for path in switched)
    net = build_model("timm/test_vit_relpos", CLASSES, image_size=SIZE)  # its relative-position MLP has dropout
    x = torch.randn(2, 3, SIZE, SIZE)
    for module in (model, net):
        module.train()
        state = torch.get_rng_state()
        module(x)
        assert torch.equal(torch.get_rng_state(), state)


# -- weights from local files --------------------------------------------------------------------


@pytest.mark.parametrize("name, suffix", [("test_vit", ".pth"), ("test_convnext", ".safetensors")])
def test_a_timm_checkpoint_loads_and_the_backbone_computes_timms_features(tmp_path, name, suffix):
    written = _timm_model(name, seed=3)  # as trained by timm: 1000 classes, its own image size
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in written.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    native = written.pretrained_cfg["input_size"][-1]
    net = build_model(f"timm/{name}", CLASSES, pretrained=str(path), image_size=native).eval()
    x = torch.randn(2, 3, native, native)
    torch.testing.assert_close(net.head.pooled(net.features(x)),
                               written.forward_head(written.forward_features(x), pre_logits=True), rtol=0, atol=0)
    assert net.head(net.features(x)).shape == (2, CLASSES)  # the classifier is replaced
    # At another image size the position embedding is resampled exactly as timm's own loader does.
    ours = build_model(f"timm/{name}", CLASSES, pretrained=str(path), image_size=SIZE).eval()
    timms = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                              num_classes=CLASSES, **({"img_size": SIZE} if "vit" in name else {})).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(ours.head.pooled(ours.features(x)),
                               timms.forward_head(timms.forward_features(x), pre_logits=True), rtol=0, atol=0)


def _openai_clip_visual(width=256, layers=10, patch=16, grid=2, output_dim=512, seed=4) -> dict:
    """A CLIP image tower's state dict in OpenAI's (and open_clip's) layout, random values, and
    two entries of the text tower a whole-model checkpoint also holds."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    state = {"visual.class_embedding": r(width), "visual.positional_embedding": r(grid * grid + 1, width),
             "visual.conv1.weight": r(width, 3, patch, patch), "visual.proj": r(width, output_dim),
             "token_embedding.weight": r(10, 8), "logit_scale": torch.tensor(4.6)}
    for name in ("ln_pre", "ln_post"):
        state[f"visual.{name}.weight"], state[f"visual.{name}.bias"] = 1 + r(width), r(width)
    for i in range(layers):
        block = f"visual.transformer.resblocks.{i}."
        state.update({block + "attn.in_proj_weight": r(3 * width, width), block + "attn.in_proj_bias": r(3 * width),
                      block + "attn.out_proj.weight": r(width, width), block + "attn.out_proj.bias": r(width),
                      block + "mlp.c_fc.weight": r(4 * width, width), block + "mlp.c_fc.bias": r(4 * width),
                      block + "mlp.c_proj.weight": r(width, 4 * width), block + "mlp.c_proj.bias": r(width)})
        for name in ("ln_1", "ln_2"):
            state[block + name + ".weight"], state[block + name + ".bias"] = 1 + r(width), r(width)
    return state


def _clip_image_features(state: dict, images: torch.Tensor, heads: int, layers: int) -> torch.Tensor:
    """OpenAI CLIP's VisionTransformer.forward up to ln_post of the class token (before the
    projection), written from its published definition: patchify, class token, position
    embedding, ln_pre, pre-norm residual blocks of multi-head attention and a GELU MLP."""
    s = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    width = s["class_embedding"].shape[0]
    x = F.conv2d(images, s["conv1.weight"], stride=s["conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([s["class_embedding"].expand(x.shape[0], 1, width), x], dim=1) + s["positional_embedding"]
    x = F.layer_norm(x, (width,), s["ln_pre.weight"], s["ln_pre.bias"], eps=1e-5)
    for i in range(layers):
        p = {k.removeprefix(f"transformer.resblocks.{i}."): v for k, v in s.items()
             if k.startswith(f"transformer.resblocks.{i}.")}
        h = F.layer_norm(x, (width,), p["ln_1.weight"], p["ln_1.bias"], eps=1e-5)
        q, k, v = (h @ p["attn.in_proj_weight"].T + p["attn.in_proj_bias"]).chunk(3, dim=-1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        attention = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        h = (attention @ v).transpose(1, 2).reshape(x.shape)
        x = x + h @ p["attn.out_proj.weight"].T + p["attn.out_proj.bias"]
        h = F.layer_norm(x, (width,), p["ln_2.weight"], p["ln_2.bias"], eps=1e-5)
        x = x + F.gelu(h @ p["mlp.c_fc.weight"].T + p["mlp.c_fc.bias"]) @ p["mlp.c_proj.weight"].T + p["mlp.c_proj.bias"]
    return F.layer_norm(x[:, 0], (width,), s["ln_post.weight"], s["ln_post.bias"], eps=1e-5)


def test_an_open_clip_checkpoint_loads_into_timms_clip_tower(tmp_path):
    """A whole CLIP checkpoint (image and text towers, OpenAI's key names, as open_clip saves
    them) loads into timm's CLIP image tower; its features equal CLIP's own computation."""
    state = _openai_clip_visual()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(state, path)
    net = build_model("timm/vit_xsmall_patch16_clip_224", CLASSES, pretrained=str(path), image_size=SIZE).eval()
    images = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(net.head.pooled(net.features(images)),
                               _clip_image_features(state, images, heads=4, layers=10), rtol=1e-4, atol=1e-5)


def test_weights_errors_name_the_file_and_never_download(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match=r"not found in .*missing\.pth.*never downloads"):
        build_model("timm/test_vit", CLASSES, pretrained=str(tmp_path / "missing.pth"), image_size=SIZE)
    with pytest.raises(FileNotFoundError, match=r"Hugging Face cache .*timm/test_vit\.r160_in1k.*never downloads"):
        build_model("timm/test_vit", CLASSES, pretrained="timm", image_size=SIZE)
    other = tmp_path / "convnext.pth"
    torch.save(_timm_model("test_convnext").state_dict(), other)
    with pytest.raises(ConfigError, match=r"convnext\.pth do not fit timm/test_vit: missing"):
        build_model("timm/test_vit", CLASSES, pretrained=str(other), image_size=SIZE)
    with pytest.raises(ConfigError, match="model.pretrained=torchvision is for the torchvision backbones"):
        build_model("timm/test_vit", CLASSES, pretrained="torchvision", image_size=SIZE)
    # timm's cache, as the hub lays it out: found, loaded, never fetched.
    snapshot = tmp_path / "hf" / "models--timm--test_vit.r160_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    written = _timm_model("test_vit", seed=5)
    save_file({k: v.contiguous() for k, v in written.state_dict().items()}, snapshot / "model.safetensors")
    net = build_model("timm/test_vit", CLASSES, pretrained="timm", image_size=160).eval()
    assert torch.equal(net.features.model.cls_token, written.cls_token)


def test_the_trainer_stops_with_one_line_on_weights_or_masks_that_do_not_fit(tmp_path, tiny_shards, capsys):
    other = tmp_path / "convnext.pth"
    torch.save(_timm_model("test_convnext").state_dict(), other)
    config = tiny_config(tmp_path, tiny_shards, data={"image_size": SIZE})
    common = ["--config", str(config), "--output_dir", str(tmp_path / "run"), "--model.arch=timm/test_vit"]
    code = train.main(common + [f"--model.pretrained={other}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("rsc_dist.train: error: pretrained weights in") and "do not fit" in err[-1]
    # RSC's spatial masks on the last layer of a class-token ViT could not change the logits.
    code = train.main(common + ["--model.head_blocks=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("rsc_dist.train: error: rsc.mode=spatial+channel mutes locations")


def test_torchvision_names_stay_torchvision_backbones(tmp_path, monkeypatch):
    """Why the seven torchvision names are not timm models (rsc_dist.models.backbones): timm's
    ResNet with torchvision's weights file computes exactly what the torchvision ResNet does, but
    under other state-dict keys (runs' checkpoints would stop loading); timm has no AlexNet;
    torchvision's ConvNeXt-Tiny weights do not load into timm's ConvNeXt-Tiny."""
    torch.manual_seed(0)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # torchvision's weights file, where --model.pretrained=torchvision looks for it
    path = tmp_path / "torch" / "hub" / "checkpoints" / torchvision.models.ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    tv = build_model("resnet18", CLASSES, pretrained="torchvision", freeze_bn=True)
    # timm's resnet18.tv_in1k names the same file: --model.pretrained=timm finds it there.
    tm = build_model("timm/resnet18.tv_in1k", CLASSES, pretrained="timm", freeze_bn=True)
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(tm.head.pooled(tm.features(x)), tv.head.pooled(tv.features(x)), rtol=1e-6, atol=1e-6)
    assert not {key for key in tv.state_dict() if key.startswith("features.")} & set(tm.state_dict())
    assert timm.list_models("alexnet*") == []
    torch.save(torchvision.models.convnext_tiny().state_dict(), tmp_path / "convnext_tiny.pth")
    with pytest.raises(ConfigError, match="do not fit timm/convnext_tiny"):
        build_model("timm/convnext_tiny", CLASSES, pretrained=str(tmp_path / "convnext_tiny.pth"))


# -- RSC on tokens -------------------------------------------------------------------------------


def _plain_token_rsc(z, head, labels, mode, p_spatial, p_channel, p_batch, prefix):
    """docs/method.md's Steps 1-4 on tokens (N, T, D), sample by sample with Python lists: the
    saliency by autograd of one sample's true-class logit; a channel's score the mean of its
    gradient over all T tokens; a patch token's score the Grad-CAM sum over channels of z times
    the channel scores; the top fraction muted (strictly above the k-th largest); the batch
    percentage over the confidence drops."""
    n, t, d = z.shape
    masks, before, after = [], [], []
    for i in range(n):
        zi = z[i:i + 1].detach().clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(head(zi)[0, labels[i]], zi)
        s_channel = gradient[0].mean(dim=0)
        s_location = (z[i, prefix:].detach() * s_channel).sum(dim=1)
        scores, p = (s_location, p_spatial) if mode == "spatial" else (s_channel, p_channel)
        k = min(math.ceil(len(scores) * p), len(scores) - 1)
        threshold = sorted(scores.tolist(), reverse=True)[k]
        keep = [0.0 if s > threshold else 1.0 for s in scores.tolist()]
        mask = torch.ones(t, 1) if mode == "spatial" else torch.tensor(keep)[None, :]
        if mode == "spatial":
            mask[prefix:, 0] = torch.tensor(keep)
        masks.append(mask)
        with torch.no_grad():
            before.append(torch.softmax(head(z[i:i + 1]), dim=1)[0, labels[i]].item())
            after.append(torch.softmax(head(z[i:i + 1] * mask), dim=1)[0, labels[i]].item())
    change = [max(b - a - CHANGE_MARGIN, 0.0) for b, a in zip(before, after)]
    tau = sorted(change, reverse=True)[min(round(n * p_batch), n - 1)]
    return torch.stack([m if c > tau else torch.ones_like(m) for m, c in zip(masks, change)])


@pytest.mark.parametrize("arch", ["timm/test_vit", "timm/test_vit2"])  # class token (head_blocks 1), pooled tokens
@pytest.mark.parametrize("mode", ["spatial", "channel"])
def test_token_rsc_equals_a_plain_implementation(arch, mode):
    torch.manual_seed(1)
    net = build_model(arch, CLASSES, image_size=64).eval()  # a 4 x 4 patch grid and a class token
    x, labels = torch.randn(8, 3, 64, 64), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    with torch.no_grad():
        z = net.features(x)
    expected = _plain_token_rsc(z, net.head, labels, mode, 1 / 3, 1 / 3.2, 0.5, prefix=1)
    got = rsc_mask(z, net.head, labels, mode=mode, p_batch=0.5)
    assert got.shape == ((8, 17, 1) if mode == "spatial" else (8, 1, 64))
    assert torch.equal(got, expected)
    assert (got == 0).any(), "the comparison must mask something to mean anything"
    if mode == "spatial":
        assert (got[:, 0] == 1).all(), "the class token is never muted"


def test_a_class_token_head_on_the_last_layer_refuses_the_spatial_mode():
    net = build_model("timm/test_vit", CLASSES, image_size=SIZE, head_blocks=0).eval()
    z = net.features(torch.randn(2, 3, SIZE, SIZE))
    patch_tokens_zeroed = z * torch.tensor([1.0, 0, 0, 0, 0])[None, :, None]
    assert torch.equal(net.head(patch_tokens_zeroed), net.head(z)) and not net.locations_reach_logits
    with pytest.raises(ConfigError, match=r"rsc.mode=spatial\+channel mutes locations .* --model.head_blocks=1"):
        RSC(context=MethodContext(locations_reach_logits=False)).check_context()
    RSC(RSC.Section(mode="channel"), MethodContext(locations_reach_logits=False)).check_context()
    assert build_model("timm/test_vit", CLASSES, image_size=SIZE).locations_reach_logits  # head_blocks: 1


def test_a_channels_last_map_gets_the_masks_of_the_same_map_channels_first():
    net = build_model("timm/test_mambaout", CLASSES, image_size=64).eval()
    z_nhwc, labels = net.features(torch.randn(6, 3, 64, 64)).detach(), torch.tensor([0, 1, 2, 3, 4, 0])

    class ChannelsFirst(torch.nn.Module):
        def forward(self, z):
            return net.head(z.permute(0, 2, 3, 1))

    for mode in ("spatial", "channel"):
        nhwc = rsc_mask(z_nhwc, net.head, labels, mode=mode, p_batch=0.5)
        nchw = rsc_mask(z_nhwc.permute(0, 3, 1, 2), ChannelsFirst(), labels, mode=mode, p_batch=0.5)
        assert torch.equal(nhwc.permute(0, 3, 1, 2), nchw) and (nchw == 0).any(), mode


def test_rsc_and_coral_run_on_token_features():
    net = build_model("timm/test_vit2", CLASSES, image_size=SIZE)
    x, labels = torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 3])
    out = net(x, objective=RSC().objective, batch=StepBatch(images=x, labels=labels, pixels=x),
              draws={"mode": "spatial", "p_batch": 1.0})
    assert out.mask.shape == (4, 1, 2, 2), "the image grids draw the patch grid"
    out.loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    z = net.features(x)
    torch.testing.assert_close(pooled_features(z, net.head), net.head.pooled(z))
    assert pooled_features(z, net.head).shape == (4, net.feature_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls; the mask 0 or 1 in z's dtype
        z = net.features(x)
        out = net(x, objective=RSC().objective, batch=StepBatch(images=x, labels=labels, pixels=x),
                  draws={"mode": "channel", "p_batch": 1.0})
    assert out.mask.dtype == z.dtype and ((out.mask == 0) | (out.mask == 1)).all()
    assert torch.isfinite(out.loss) and (out.mask == 0).any()


def test_an_image_size_the_model_cannot_take_is_one_line():
    with pytest.raises(ConfigError, match=r"timm/test_vit cannot run on 40 x 40 px inputs \(data.image_size\): "
                                          r"Input height \(40\) should be divisible by patch size \(16\)"):
        build_model("timm/test_vit", CLASSES, image_size=40)


# -- the config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, message", [
    ("timm/vit_tiny_patch16_2244", "timm 1.0.31 has no model 'vit_tiny_patch16_2244'; did you mean "
                                   "timm/vit_tiny_patch16_224"),
    ("timm/resnet50.ram_in2k", "timm's resnet50 has no pretrained tag 'ram_in2k'; its tags: a1_in1k"),
    ("resnet19", "model.arch must be one of resnet18"),
])
def test_an_unknown_arch_is_one_line_with_close_names(arch, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("'", "'")):
        load_config("demo", [f"--model.arch={arch}"])


def test_preprocessing_follows_the_backbone_unless_the_config_sets_it():
    clip = load_config("demo", ["--model.arch=timm/vit_base_patch16_clip_224.openai", "--data.image_size=224"])
    assert clip.data.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073)) and clip.data.image_size == 224
    assert load_config("demo", ["--model.arch=timm/vit_tiny_patch16_224"]).data.image_size == 64  # the preset's
    chosen = load_config("demo", ["--model.arch=timm/vit_tiny_patch16_224", "--data.mean=[0.1,0.2,0.3]"])
    assert chosen.data.mean == (0.1, 0.2, 0.3) and chosen.data.std == (0.5, 0.5, 0.5)
    assert load_config("demo").data.mean == (0.485, 0.456, 0.406)  # torchvision: the ImageNet statistics


def test_the_timm_presets_resolve():
    domainbed = load_config("domainbed2024_pacs_resnet50")
    assert domainbed.model.arch == "timm/resnet50.ram_in1k" and domainbed.model.pretrained == "timm"
    assert (domainbed.optim.name, domainbed.optim.lr, domainbed.data.batch_size) == ("adam", 5e-5, 32)
    clip = load_config("domainbed_pacs_clip_vitb16")
    assert clip.model.arch == "timm/vit_base_patch16_clip_quickgelu_224.openai" and clip.data.image_size == 224
    assert clip.rsc.mode == "channel" and clip.model.head_blocks == 0


def test_runs_made_before_keep_their_fingerprint():
    """model.head_blocks at its default leaves the trajectory settings as they were: the demo's
    default run folder is the one it had before the setting existed (pinned from that version)."""
    from rsc_dist.config import trajectory_fingerprint, trajectory_settings

    demo = load_config("demo")
    assert trajectory_fingerprint(demo, 1) == "26575016d91e9f11"
    assert "model.head_blocks" not in trajectory_settings(demo)
    assert trajectory_settings(load_config("demo", ["--model.head_blocks=1"]))["model.head_blocks"] == 1
