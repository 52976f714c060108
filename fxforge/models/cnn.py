"""A small residual CNN on (batch, 3, 32, 32) images: convolution, batch norm, ReLU,
pooling, residual adds (one identity, one 1x1-projected shortcut) and a Linear head, for
passes and backends that must handle more than linear layers.

Module paths: stem.conv, stem.bn, block1.conv1 ... block2.shortcut.conv, head.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from fxforge.models.base import ZooModel, seeded

IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10


class ConvBN(nn.Module):
    """Conv2d (no bias: the batch norm supplies it) followed by BatchNorm2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class ResidualBlock(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)); the shortcut projects when shapes change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = ConvBN(in_channels, out_channels, 3, stride)
        self.conv2 = ConvBN(out_channels, out_channels, 3)
        self.relu = nn.ReLU()
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = ConvBN(in_channels, out_channels, 1, stride) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.conv2(self.relu(self.conv1(x))) + identity)


class SmallCNN(nn.Module):
    """stem (3->16) -> block (16) -> maxpool -> block (16->32, stride 2) -> avgpool -> Linear."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = ConvBN(3, 16, 3)
        self.relu = nn.ReLU()
        self.block1 = ResidualBlock(16, 16)
        self.pool = nn.MaxPool2d(2)
        self.block2 = ResidualBlock(16, 32, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.block1(self.relu(self.stem(x))))
        x = self.avgpool(self.block2(x))
        return self.head(torch.flatten(x, 1))


def _randomize_batch_norm_stats(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters.

    Freshly built BatchNorms are identities in eval mode (mean 0, var 1, weight 1, bias 0),
    which would let a wrong conv+BN folding or a dropped BN pass every test unnoticed.
    """
    for module in model.modules():
        if not isinstance(module, nn.BatchNorm2d):
            continue
        n = module.num_features
        module.running_mean.copy_(0.1 * torch.randn(n))
        module.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0))
        with torch.no_grad():
            module.weight.copy_(torch.empty(n).uniform_(0.5, 1.5))
            module.bias.copy_(0.1 * torch.randn(n))


def build_cnn(seed: int) -> ZooModel:
    """The zoo's `cnn`: (batch, 3, 32, 32) -> (batch, 10); make_inputs varies batch only."""
    with seeded(seed):
        model = SmallCNN()
        _randomize_batch_norm_stats(model)
    model.eval()

    def make_inputs(batch: int = 2, seq: int | None = None) -> tuple[tuple, dict]:
        if batch < 1:
            raise ValueError(f"cnn: batch must be >= 1, got {batch}")
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, *IMAGE_SHAPE, generator=generator),), {}

    args, kwargs = make_inputs()
    return ZooModel(
        name="cnn",
        model=model,
        args=args,
        kwargs=kwargs,
        dynamic_shapes=({0: Dim("batch", min=1)},),
        description="residual CNN on 3x32x32 images: Conv2d/BatchNorm/ReLU, max and average "
        "pooling, identity and projected residual adds, Linear head (10 classes)",
        make_inputs=make_inputs,
    )
