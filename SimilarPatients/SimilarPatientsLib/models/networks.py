"""The image encoders, built from MONAI (or, for the Models Genesis U-Net, our own module with the
upstream's parameter names), each ending in the pooling head that makes the published embedding.

Every builder returns an ``nn.Module`` mapping a ``(B, 1, X, Y, Z)`` crop to ``(B, D)``. Its
``state_dict`` keys are those of the upstream checkpoint's encoder (after the prefix a checkpoint format
strips), so weights load strictly.
"""

from __future__ import annotations

from ..util.optional import optional_import

torch = optional_import("torch", "embed")
F = torch.nn.functional
nn = torch.nn


def _global_average_of_last_stage(stages: list) -> torch.Tensor:
    return F.adaptive_avg_pool3d(stages[-1], 1).flatten(start_dim=1)


def fmcib_resnet() -> nn.Module:
    """FMCIB's trunk: MONAI 3D ResNet-50, width x2, stride-2 first convolution, no classifier: 4096-d."""
    from monai.networks.nets import resnet50

    return resnet50(
        spatial_dims=3,
        n_input_channels=1,
        widen_factor=2,
        conv1_t_stride=2,
        feed_forward=False,
        bias_downsample=True,
    )


def segres_encoder(init_filters: int = 32, norm: str = "batch") -> nn.Module:
    """MONAI ``SegResEncoder`` with 5 stages, global average of the last: CT-FM (32 filters, batch norm,
    512-d) and VISTA3D's image encoder (48 filters, instance norm, 768-d)."""
    from monai.networks.nets.segresnet_ds import SegResEncoder

    return SegResEncoder(
        spatial_dims=3,
        init_filters=init_filters,
        in_channels=1,
        norm=norm,
        blocks_down=(1, 2, 2, 4, 4),
        head_module=_global_average_of_last_stage,
    )


class SampleNorm3d(nn.modules.batchnorm._BatchNorm):
    """The Models Genesis U-Net's batch norm, which always normalises with the statistics of what it is
    given (its running averages are never used). Here each crop is normalised by its own statistics, as a
    batch of one is upstream, so an embedding does not depend on the crops batched with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x, weight=self.weight, bias=self.bias, use_input_stats=True, eps=self.eps)


class _ConvNormReLU(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = SampleNorm3d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))


class _DownStage(nn.Module):
    """Two convolutions (32·2^depth then twice that channels), max-pooled except at the deepest stage."""

    def __init__(self, in_channels: int, depth: int, pool: bool):
        super().__init__()
        width = 32 * 2**depth
        self.ops = nn.Sequential(_ConvNormReLU(in_channels, width), _ConvNormReLU(width, 2 * width))
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ops(x)
        return F.max_pool3d(x, 2) if self.pool else x


class UNet3DEncoder(nn.Module):
    """The encoder half of the Models Genesis 3D U-Net (also SuPreM's U-Net backbone): 512 channels at 1/8
    resolution. ``head``: ``"global"`` averages them (SuPreM, 512-d); ``"genesis"`` average-pools 3³ with
    stride 2 and flattens (Models Genesis as TumorImagingBench ran it, 4096-d on a 48³ crop)."""

    def __init__(self, head: str = "global"):
        super().__init__()
        if head not in ("global", "genesis"):
            raise ValueError(f"unknown head {head!r}")
        self.head = head
        self.down_tr64 = _DownStage(1, 0, pool=True)
        self.down_tr128 = _DownStage(64, 1, pool=True)
        self.down_tr256 = _DownStage(128, 2, pool=True)
        self.down_tr512 = _DownStage(256, 3, pool=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down_tr512(self.down_tr256(self.down_tr128(self.down_tr64(x))))
        if self.head == "global":
            return F.adaptive_avg_pool3d(x, 1).flatten(start_dim=1)
        return F.avg_pool3d(x, 3, stride=2).flatten(start_dim=1)


class SwinEncoder(nn.Module):
    """The Swin transformer of MONAI's ``SwinUNETR`` (``use_v2``), global average of its last stage:
    VoCo with ``feature_size=192`` gives 16·192 = 3072-d. Keys are those under ``swinViT.``."""

    def __init__(self, feature_size: int = 192):
        super().__init__()
        from monai.networks.nets.swin_unetr import MERGING_MODE, SwinTransformer

        self.transformer = SwinTransformer(
            in_chans=1,
            embed_dim=feature_size,
            window_size=(7, 7, 7),
            patch_size=(2, 2, 2),
            depths=(2, 2, 2, 2),
            num_heads=(3, 6, 12, 24),
            mlp_ratio=4.0,
            qkv_bias=True,
            norm_layer=nn.LayerNorm,
            spatial_dims=3,
            downsample=MERGING_MODE["merging"],
            use_v2=True,
        )

    def state_dict(self, *args, **kwargs):
        return self.transformer.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.transformer.load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _global_average_of_last_stage(self.transformer(x, normalize=True))
