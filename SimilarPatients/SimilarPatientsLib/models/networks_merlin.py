"""Merlin's image encoder: an I3D ResNet-152 (torchvision's 2-D ResNet-152 inflated to 3-D, written here
without torchvision) and its 512-d contrastive head, as ``merlin``'s ``Merlin()`` returns for an image
(output 0: L2-normalised).

Key names are those of Merlin's checkpoint under ``encode_image.`` (``i3_resnet.conv1.weight``, ...); the
phenotype classifier (``i3_resnet.classifier``) and the text tower are not built. The inflation fixes the
shapes: the stem is 3x7x7 (stride 1x2x2), every 3x3 becomes 3x3x3 with the same stride along depth, 1x1
becomes 1x1x1; the batch norms keep their 2-D parameters.
"""

from __future__ import annotations

from ..util.optional import optional_import

torch = optional_import("torch", "embed")
F = torch.nn.functional
nn = torch.nn

#: ResNet-152: bottleneck blocks per layer and their inner widths (outputs are 4 times wider).
BLOCKS = (3, 8, 36, 3)
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4


class Bottleneck3d(nn.Module):
    """1x1x1 reduce, 3x3x3 (strided in all three axes), 1x1x1 expand, each batch-normalised; a strided
    1x1x1 projection of the input where the shape changes."""

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv3d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm3d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class I3ResNet(nn.Module):
    """The inflated ResNet-152 trunk and the contrastive head (a 1x1x1 convolution 2048 -> 512 on the
    globally averaged features)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 64, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        channels = 64
        for index, (blocks, width) in enumerate(zip(BLOCKS, WIDTHS)):
            layer = []
            for block in range(blocks):
                layer.append(Bottleneck3d(channels, width, 2 if block == 0 and index > 0 else 1))
                channels = width * EXPANSION
            setattr(self, f"layer{index + 1}", nn.Sequential(*layer))
        self.contrastive_head = nn.Conv3d(channels, 512, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool3d(x, kernel_size=3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.contrastive_head(F.adaptive_avg_pool3d(x, 1)).flatten(start_dim=1)


class MerlinImageEncoder(nn.Module):
    """Merlin's ``encode_image``: a ``(B, 1, X, Y, Z)`` crop (RAS axes, values in [0, 1]) is put depth
    first (Z, X, Y) and repeated to the 3 channels the inflated ImageNet stem expects; the 512-d contrastive
    features come out L2-normalised, as Merlin's forward returns them."""

    def __init__(self):
        super().__init__()
        self.i3_resnet = I3ResNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 1, 4, 2, 3).expand(-1, 3, -1, -1, -1)
        return F.normalize(self.i3_resnet(x), dim=-1)
