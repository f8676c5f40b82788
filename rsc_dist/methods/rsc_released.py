"""The released RSC code's mask logic, ported line by line (docs/method.md, "Where the released
code differs").

A reference, not the method: it shares no code with ``rsc_dist.rsc`` on purpose. The tests
compare ``rsc_mask`` against it, and ``rsc_dist.bench`` times it to show what the released
forward costs. Like the released forward it runs a backward pass through the head into a copy
of the features (leaving gradients on the head's parameters: callers clear them, as the
released code's ``zero_grad`` does), full sorts, and a ``nonzero()`` host sync. Only the index
clamps are added (the released code crashes there).
"""

import math

import torch
import torch.nn.functional as F


def released_mask(z, head, y, mode, p_spatial=1 / 3, p_channel=1 / 3.2, p_batch=1 / 3):
    n, c, h, w = z.shape
    x_new = z.clone().detach().requires_grad_(True)
    output = head(x_new)
    one_hot_sparse = torch.zeros_like(output)
    one_hot_sparse[torch.arange(n), y] = 1
    (output * one_hot_sparse).sum().backward()
    grads_val = x_new.grad.clone().detach()
    x_new = x_new.detach()

    grad_channel_mean = grads_val.view(n, c, -1).mean(dim=2)
    channel_mean = grad_channel_mean
    spatial_mean = (x_new * grad_channel_mean.view(n, c, 1, 1)).sum(dim=1).view(n, h * w)

    if mode == "spatial":
        drop = min(math.ceil(h * w * p_spatial), h * w - 1)
        threshold = torch.sort(spatial_mean, dim=1, descending=True)[0][:, drop]
        mask = torch.where(spatial_mean > threshold.view(n, 1), 0.0, 1.0).to(z.dtype)
        mask = mask.view(n, 1, h, w)
    else:
        drop = min(math.ceil(c * p_channel), c - 1)
        threshold = torch.sort(channel_mean, dim=1, descending=True)[0][:, drop]
        mask = torch.where(channel_mean > threshold.view(n, 1), 0.0, 1.0).to(z.dtype)
        mask = mask.view(n, c, 1, 1)

    with torch.no_grad():
        before = (one_hot_sparse * F.softmax(output.detach(), dim=1)).sum(dim=1)
        after = (one_hot_sparse * F.softmax(head(x_new * mask), dim=1)).sum(dim=1)
    change = before - after - 0.0001
    change = torch.where(change > 0, change, torch.zeros_like(change))
    index = min(int(round(float(n) * p_batch)), n - 1)
    th_fg_value = torch.sort(change, dim=0, descending=True)[0][index]
    drop_index_fg = change.gt(th_fg_value).long()
    ignore_index_fg = 1 - drop_index_fg
    not_01_ignore_index_fg = ignore_index_fg.nonzero()[:, 0]
    mask = mask.expand(n, *mask.shape[1:]).clone()
    mask[not_01_ignore_index_fg.long(), :] = 1
    return mask
