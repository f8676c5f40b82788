"""DomainBed's ResNet dropout (model.dropout): the dropout of the pooled feature vector, with
masks drawn from each sample's identity and the step, so a rank's share of the batch drops what
the whole batch on one process drops; RSC's closed form stays exact on the dropped features.
(The trainer with it on 2 ranks against 1 process: tests/test_method_suite.py.)"""

import torch
import torch.nn.functional as F

from rsc_dist.methods.base import StepBatch
from rsc_dist.methods.rsc_masks import rsc_mask, saliency
from rsc_dist.models.build import build_model
from rsc_dist.models.feature_dropout import FeatureDropout, channel_keep_mask, dropout_seeds
from rsc_dist.models.heads import PooledLinearHead
from rsc_dist.models.network import Network


def batch(n=8, step=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return StepBatch(images=torch.randn(n, 3, 40, 40, generator=g), labels=torch.randint(0, 3, (n,), generator=g),
                     pixels=torch.zeros(n, dtype=torch.uint8), sample_ids=torch.randint(0, 2**62, (n,), generator=g),
                     step=step)


def small_network(dropout: float) -> Network:
    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 5, stride=4), torch.nn.ReLU())
    return Network(features, PooledLinearHead(32, 3), dropout=dropout)


def test_a_ranks_share_drops_what_the_whole_batch_drops():
    network = small_network(0.5)
    whole = batch()
    z = network.featurize(whole)
    halves = [network.featurize(whole.replace(images=whole.images[i:i + 4], sample_ids=whole.sample_ids[i:i + 4]))
              for i in (0, 4)]
    assert torch.allclose(torch.cat(halves), z, atol=1e-6)  # per sample: rank 0 and rank 1's halves
    plain = network.features(whole.images)
    dropped = (z == 0).all(dim=(2, 3)) & ~(plain == 0).all(dim=(2, 3))
    assert torch.allclose(z[~dropped], 2 * plain[~dropped])  # kept channels scaled by 1 / (1 - p)
    assert 0.3 < dropped.float().mean() < 0.7  # about p of the channels, whole channels at once
    assert not torch.equal(network.featurize(whole.replace(step=6)), z)  # another step, other masks
    network.eval()
    assert torch.equal(network.featurize(whole), plain)  # evaluation never drops
    assert torch.equal(small_network(0.0).featurize(whole), small_network(0.0).features(whole.images))
    assert build_model("resnet18", 3, dropout=0.1).dropout.p == 0.1  # the model builder passes it on


def test_it_is_dropout_of_the_pooled_vector_before_the_head():
    """DomainBed: classifier(Dropout(p)(featurizer(x))). Dropping channel c of z before the
    pooling is dropping unit c of the pooled vector: the head's logits agree."""
    z = torch.randn(6, 16, 3, 3)
    seeds = torch.arange(6, dtype=torch.int64) * 7919
    head = PooledLinearHead(16, 4)
    dropout = FeatureDropout(0.5).train()
    keep = channel_keep_mask(dropout_seeds(seeds, 2), 16, 0.5)
    expected = head.fc(z.mean(dim=(2, 3)) * keep / 0.5)
    assert torch.allclose(head(dropout(z, dropout_seeds(seeds, 2))), expected, atol=1e-6)


def test_rscs_closed_form_is_the_gradient_on_the_dropped_features():
    """DomainBed's RSC takes autograd.grad of the true-class logit with respect to its
    (dropped-out) features; the closed form here is the head's gradient at its input, the
    dropped z: both give the same saliency, so the masks are the same."""
    torch.manual_seed(1)
    z = torch.randn(6, 16, 3, 3)
    labels = torch.randint(0, 4, (6,))
    head = PooledLinearHead(16, 4)
    dropped = FeatureDropout(0.5).train()(z, torch.arange(6, dtype=torch.int64))
    copy = dropped.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(head(copy).gather(1, labels[:, None]).sum(), copy)
    assert torch.allclose(saliency(dropped, head, labels), gradient, atol=1e-7)

    def as_function(features):  # any head that is not PooledLinearHead: RSC's autograd path
        return head(features)

    closed = rsc_mask(dropped, head, labels, mode="channel", p_channel=1 / 3, p_batch=0.5)
    autograd = rsc_mask(dropped, as_function, labels, mode="channel", p_channel=1 / 3, p_batch=0.5)
    assert torch.equal(closed, autograd)
    assert F.cross_entropy(head(dropped * closed), labels).isfinite()
