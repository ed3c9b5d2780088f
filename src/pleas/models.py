"""Small model factories for experiments: plain ``nn.Module``s that torch.fx can trace.

Every model maps a batch of inputs to logits (N, num_classes). No forward pass has data-dependent
control flow; flattening is done with ``nn.Flatten`` or ``torch.flatten``.

* :func:`mlp`: (N, *) -> Flatten -> [Linear, ReLU] x depth -> Linear.
* :func:`vgg`: (N, C, H, W) -> 3 stages of [Conv3x3, BN, ReLU] x depth + MaxPool2 -> GAP -> Linear.
* :func:`resnet20`: (N, C, H, W) -> CIFAR-style ResNet-20 (3 stages x 3 BasicBlocks) -> GAP -> Linear.
* :func:`cnn1d`: (N, C, L) -> 3 blocks of [Conv1d, BN, ReLU, MaxPool1d(2)] -> GAP -> Linear.
* :func:`torchvision_resnet18`: torchvision's ResNet-18 with ``in_channels`` input channels (needs torchvision).
* :func:`vit`: timm's ``VisionTransformer`` with a small configuration (needs timm).

:func:`create` looks a factory up by name and can seed the initialisation.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def mlp(in_features: int, num_classes: int, *, hidden: int = 128, depth: int = 3) -> nn.Sequential:
    """A ReLU MLP: input (N, *) with prod(*) == in_features -> logits (N, num_classes).

    ``depth`` is the number of hidden layers (Linear + ReLU), each ``hidden`` wide, before the
    output Linear; ``depth=3`` has 4 Linear layers in total.
    """
    _check_positive(in_features=in_features, num_classes=num_classes, hidden=hidden)
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ValueError(f"depth must be an int >= 0, got {depth!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def vgg(
    in_channels: int, num_classes: int, *, width: int = 32, depth: int | Sequence[int] = 1
) -> nn.Sequential:
    """A small VGG-style CNN with BatchNorm: (N, in_channels, H, W) -> logits (N, num_classes).

    Three stages with ``width``, ``2*width`` and ``4*width`` channels; each stage is ``depth``
    (an int, or one int per stage) blocks of Conv3x3 (no bias) + BatchNorm2d + ReLU, then
    MaxPool2d(2). Then global average pooling and a Linear head. Needs H, W >= 8.
    """
    _check_positive(in_channels=in_channels, num_classes=num_classes, width=width)
    depths = [depth] * 3 if isinstance(depth, int) else list(depth)
    if len(depths) != 3:
        raise ValueError(f"depth must be an int or 3 ints (one per stage), got {depth!r}")
    _check_positive(**{f"depth[{i}]": d for i, d in enumerate(depths)})
    layers: list[nn.Module] = []
    channels = in_channels
    for stage, n_convs in enumerate(depths):
        out = width * 2**stage
        for _ in range(n_convs):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: (N, c_in, H, W) -> (N, c_out, H/stride, W/stride).

    relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), where the shortcut is a 1x1 conv + BN when
    the shape changes and the identity otherwise.
    """

    def __init__(self, c_in: int, c_out: int, *, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: (N, in_channels, H, W) -> logits (N, num_classes).

    Stem Conv3x3 + BN + ReLU, three stages of BasicBlocks (strides 1, 2, 2), global average
    pooling, Linear head.
    """

    def __init__(self, in_channels: int, num_classes: int, *, widths: Sequence[int], blocks_per_stage: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages = []
        channels = widths[0]
        for i, out in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(channels, out, stride=stride))
                channels = out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def resnet20(in_channels: int, num_classes: int, *, width: int = 1) -> ResNet:
    """ResNet-20 (He et al. 2016, CIFAR variant): (N, in_channels, H, W) -> logits (N, num_classes).

    Three stages of 3 BasicBlocks with 16*width, 32*width and 64*width channels.
    """
    _check_positive(in_channels=in_channels, num_classes=num_classes, width=width)
    return ResNet(in_channels, num_classes, widths=(16 * width, 32 * width, 64 * width), blocks_per_stage=3)


def cnn1d(num_classes: int, *, in_channels: int = 1, width: int = 32) -> nn.Sequential:
    """A 1-D CNN for signals such as MNIST-1D: (N, in_channels, L) -> logits (N, num_classes).

    Three blocks with ``width``, ``2*width`` and ``4*width`` channels, each Conv1d(k=5, no bias) +
    BatchNorm1d + ReLU + MaxPool1d(2); then global average pooling and a Linear head. Needs L >= 8.
    """
    _check_positive(num_classes=num_classes, in_channels=in_channels, width=width)
    layers: list[nn.Module] = []
    channels = in_channels
    for stage in range(3):
        out = width * 2**stage
        layers += [
            nn.Conv1d(channels, out, 5, padding=2, bias=False),
            nn.BatchNorm1d(out),
            nn.ReLU(),
            nn.MaxPool1d(2),
        ]
        channels = out
    layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def torchvision_resnet18(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's ``resnet18`` (ImageNet stem: Conv7x7 stride 2 + MaxPool; random weights) for
    (N, in_channels, H, W) inputs -> logits (N, num_classes). Only the stem convolution differs from
    torchvision's model: it reads ``in_channels`` channels instead of 3. Works from 32x32 inputs up.
    """
    _check_positive(in_channels=in_channels, num_classes=num_classes)
    try:
        import torchvision
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("torchvision_resnet18 needs torchvision: pip install 'pleas[vision]'") from err
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    stem = model.conv1
    model.conv1 = nn.Conv2d(in_channels, stem.out_channels, stem.kernel_size, stride=stem.stride,
                            padding=stem.padding, bias=False)
    return model


def vit(
    in_channels: int,
    num_classes: int,
    *,
    img_size: int,
    patch_size: int = 4,
    embed_dim: int = 64,
    depth: int = 4,
    num_heads: int = 4,
    mlp_ratio: float = 4.0,
) -> nn.Module:
    """timm's ``VisionTransformer`` (random weights; a plain ``nn.Module``): (N, in_channels, img_size,
    img_size) -> logits (N, num_classes). Non-overlapping ``patch_size`` patches embedded to ``embed_dim``
    by a strided conv, a class token and learned position embeddings, ``depth`` pre-norm blocks
    (LayerNorm, ``num_heads``-head self-attention, LayerNorm, GELU MLP of ``mlp_ratio`` x ``embed_dim``),
    a final LayerNorm and a Linear head on the class token. No dropout.
    """
    _check_positive(in_channels=in_channels, num_classes=num_classes, img_size=img_size, patch_size=patch_size,
                    embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("vit needs timm: pip install 'pleas[vision]'") from err
    return VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_channels, num_classes=num_classes,
                             embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                             class_token=True, global_pool="token")


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "vgg": vgg,
    "resnet20": resnet20,
    "cnn1d": cnn1d,
    "torchvision_resnet18": torchvision_resnet18,
    "vit": vit,
}


def create(name: str, *args, seed: int | None = None, **kwargs) -> nn.Module:
    """Build the architecture ``name`` (one of :data:`ARCHITECTURES`) with the given arguments.

    If ``seed`` is given, the initial weights depend only on it (the global torch RNG is left as it
    was); otherwise they come from the global torch RNG.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known architectures are {', '.join(map(repr, ARCHITECTURES))}")
    factory = ARCHITECTURES[name]
    if seed is None:
        return factory(*args, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(*args, **kwargs)
