"""The multi-resolution teacher head as plain eager PyTorch: the baseline the fused kernels are timed against.
Per resolution a 1x1 F.conv2d, then the head's resize to the base map (F.interpolate 'area' along an axis that
shrinks, 'nearest' along one that grows, the semantics of candle_ext.reference.resize), then torch.cat."""
import torch
import torch.nn.functional as F


def eager_resize(m: torch.Tensor, size) -> torch.Tensor:
    h, w = m.shape[-2:]
    if h > size[0] or w > size[1]:
        m = F.adaptive_avg_pool2d(m, (min(h, size[0]), min(w, size[1])))
    return m if tuple(m.shape[-2:]) == tuple(size) else F.interpolate(m, size=tuple(size), mode="nearest")


def eager_head(feats, weights, biases, base):
    size = feats[base].shape[-2:]
    return torch.cat([eager_resize(F.conv2d(f, w[:, :, None, None], b), size)
                      for f, w, b in zip(feats, weights, biases)], dim=1)
