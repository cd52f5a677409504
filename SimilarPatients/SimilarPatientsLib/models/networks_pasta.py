"""PASTA's image encoder: the encoder half of the authors' nnU-Net-style ``Generic_UNet`` (5 strided stages
and a bottleneck, instance norm, leaky ReLU), globally averaged as TumorImagingBench ran it: 1024-d.

Key names are those of ``PASTA final.pth`` after its ``module.`` prefix (``conv_blocks_context.*``); the
decoder (``conv_blocks_localization``, ``tu``, ``seg_outputs``) is not built.
"""

from __future__ import annotations

from ..util.optional import optional_import

torch = optional_import("torch", "embed")
F = torch.nn.functional
nn = torch.nn

#: Channels of the 5 context stages and the bottleneck (64 doubling, capped at 1024).
WIDTHS = (64, 128, 256, 512, 1024, 1024)


class _ConvNormLeaky(nn.Module):
    """One 3³ convolution, affine instance norm, leaky ReLU (slope 0.01): nnU-Net's ``ConvDropoutNormNonlin``
    without its (zero) dropout; ``conv`` and ``instnorm`` are the upstream names."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)
        self.instnorm = nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.instnorm(self.conv(x)), 0.01)


class _Stage(nn.Module):
    """``StackedConvLayers``: convolutions under ``blocks``, the first one strided when the stage downsamples."""

    def __init__(self, in_channels: int, out_channels: int, convolutions: int, stride: int):
        super().__init__()
        self.blocks = nn.Sequential(
            *(
                _ConvNormLeaky(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1)
                for i in range(convolutions)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class PastaEncoder(nn.Module):
    """``conv_blocks_context``: stage 0 at full resolution, stages 1-4 and the bottleneck each halving it
    by a stride-2 first convolution; the bottleneck is two single-convolution stages in a ``Sequential``
    (upstream's layout). A 48³ crop ends as 1024 x 2³, averaged to 1024 values."""

    def __init__(self):
        super().__init__()
        stages = [_Stage(1 if d == 0 else WIDTHS[d - 1], WIDTHS[d], 2, 1 if d == 0 else 2) for d in range(5)]
        bottleneck = nn.Sequential(_Stage(WIDTHS[4], WIDTHS[5], 1, 2), _Stage(WIDTHS[5], WIDTHS[5], 1, 1))
        self.conv_blocks_context = nn.ModuleList([*stages, bottleneck])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.conv_blocks_context:
            x = stage(x)
        return F.adaptive_avg_pool3d(x, 1).flatten(start_dim=1)
