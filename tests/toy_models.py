"""Small models covering every built-in handler, for the invariant tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in=20, hidden=32, d_out=5, depth=3):
        super().__init__()
        layers, d = [], d_in
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        return self.head(self.body(x.flatten(1)))


class VGGBN(nn.Module):
    """conv-BN-ReLU stages with max pooling, flatten (not global pooling) into a Linear."""

    def __init__(self, width=8, classes=10):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 4 * 4, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class CatSkip(nn.Module):
    """DenseNet-style: features concatenated along channels, including the input itself."""

    def __init__(self, w=6, classes=4):
        super().__init__()
        self.a = nn.Conv2d(3, w, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(w)
        self.b = nn.Conv2d(3 + w, w, 3, padding=1)
        self.bn_cat = nn.BatchNorm2d(3 + 2 * w)
        self.c = nn.Conv2d(3 + 2 * w, 2 * w, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(2 * w * 4 + w, classes)

    def forward(self, x):
        a = F.relu(self.bn_a(self.a(x)))
        h = torch.cat([x, a], dim=1)
        b = torch.relu(self.b(h))
        h = torch.cat([h, b], 1)
        c = self.c(F.relu(self.bn_cat(h)))
        pooled = torch.flatten(self.pool(c), 1)
        gap = a.mean((2, 3))
        return self.head(torch.cat([pooled, gap], dim=1))


class Mixed(nn.Module):
    """GroupNorm, depthwise conv, SE-style gating, layer scale, scalar mul, LayerNorm over tokens."""

    def __init__(self, w=8, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(3, w, 3, padding=1)
        self.gn = nn.GroupNorm(2, w)
        self.dw = nn.Conv2d(w, w, 3, padding=1, groups=w)
        self.se_reduce = nn.Linear(w, 4)
        self.se_expand = nn.Linear(4, w)
        self.gamma = nn.Parameter(torch.rand(w, 1, 1) + 0.5)
        self.ln = nn.LayerNorm(w)
        self.mix = nn.Linear(16, 16)  # mixes tokens, not units
        self.proj = nn.Linear(w, 2 * w)
        self.head = nn.Linear(2 * w, classes)

    def forward(self, x):
        h = F.gelu(self.gn(self.stem(x)))
        s = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(h.mean((2, 3))))))
        h = h + self.gamma * self.dw(h) * s[:, :, None, None]
        h = F.avg_pool2d(h, 2) * 0.5
        t = h.flatten(2).transpose(1, 2)  # (N, tokens=16, w)
        t = self.ln(t)
        t = t + self.mix(t.transpose(1, 2)).transpose(1, 2)
        return self.head(F.silu(self.proj(t)).mean(1))


class Seq1d(nn.Module):
    def __init__(self, w=8, classes=5):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, w, 5, padding=2), nn.BatchNorm1d(w), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(w, w, 3, padding=1), nn.BatchNorm1d(w), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
            nn.Linear(w, classes),
        )

    def forward(self, x):
        return self.net(x)


def randomise_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics and affine parameters, so that a wrong permutation
    of any of them changes the output."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            with torch.no_grad():
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


class Grouped(nn.Module):
    """A RegNet-style bottleneck: 1x1 conv, grouped 3x3 conv (4 groups), 1x1 conv, residual, head."""

    def __init__(self, w=16, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(w, w, 1), nn.BatchNorm2d(w), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, groups=4), nn.BatchNorm2d(w), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(w, w, 1), nn.BatchNorm2d(w))
        self.head = nn.Linear(w, classes)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.c(self.b(self.a(h))))
        return self.head(h.mean((2, 3)))


def channel_shuffle(x, groups: int):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class Shuffled(nn.Module):
    """Two ShuffleNet-style units: split the channels in halves, transform one, join, shuffle."""

    def __init__(self, w=16, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.units = nn.ModuleList(
            nn.Sequential(nn.Conv2d(w // 2, w // 2, 1), nn.BatchNorm2d(w // 2), nn.ReLU()) for _ in range(2))
        self.head = nn.Linear(w, classes)

    def forward(self, x):
        h = self.stem(x)
        for unit in self.units:
            keep, change = h.chunk(2, dim=1)
            h = channel_shuffle(torch.cat([keep, unit(change)], 1), 2)
        return self.head(h.mean((2, 3)))
