"""PASTA, Merlin and CT-CLIP as our own networks: their state-dict keys and shapes are the upstream
checkpoints' (listed here from the authors' code), synthetic checkpoints in each upstream layout load
strictly and are what runs, embeddings have the NLST-Sybil reference's length and do not depend on
batching, the CLI queries NLST-Sybil with each, and the CT-CLIP recipe is TumorImagingBench's (1.5 mm
along x, after orienting to LPS)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

torch = pytest.importorskip("torch", reason="the embed extra (torch)")
from SimilarPatientsLib import SimilarPatientsError
from SimilarPatientsLib.cli import main
from SimilarPatientsLib.imaging import recipes
from SimilarPatientsLib.imaging.crop import crop
from SimilarPatientsLib.imaging.tumor import from_binary_mask
from SimilarPatientsLib.models import checkpoints, registry
from SimilarPatientsLib.models.embedder import Embedder
from synthetic_ct import tumor_ct
from synthetic_weights import upstream_checkpoint
from test_crop_and_inputs import random_ct, tumorimagingbench_pipeline

pytestmark = pytest.mark.torch

OWN = ("PASTA", "Merlin", "CTClipVit")


def _meta_shapes(name: str) -> dict:
    with torch.device("meta"):
        network = registry.get(name).build()
    return {k: tuple(v.shape) for k, v in network.state_dict().items()}


def _conv_norm(prefix: str, out_channels: int, in_channels: int, norm: str) -> dict:
    return {
        f"{prefix}.conv.weight": (out_channels, in_channels, 3, 3, 3),
        f"{prefix}.conv.bias": (out_channels,),
        f"{prefix}.{norm}.weight": (out_channels,),
        f"{prefix}.{norm}.bias": (out_channels,),
    }


def test_pasta_keys_and_shapes_are_the_generic_unet_encoders():
    """``Generic_UNet(input_channels=1)``: 64 base features doubling to at most 1024, 5 pooling stages of two
    convolutions, a bottleneck of two one-convolution stacks; keys under ``conv_blocks_context``."""
    expected = {}
    channels = [1, 64, 128, 256, 512, 1024]
    for stage in range(5):
        for conv in range(2):
            source = channels[stage] if conv == 0 else channels[stage + 1]
            prefix = f"conv_blocks_context.{stage}.blocks.{conv}"
            expected |= _conv_norm(prefix, channels[stage + 1], source, "instnorm")
    for half in range(2):
        expected |= _conv_norm(f"conv_blocks_context.5.{half}.blocks.0", 1024, 1024, "instnorm")
    assert _meta_shapes("PASTA") == expected


def _batch_norm(prefix: str, channels: int) -> dict:
    return {
        f"{prefix}.weight": (channels,),
        f"{prefix}.bias": (channels,),
        f"{prefix}.running_mean": (channels,),
        f"{prefix}.running_var": (channels,),
        f"{prefix}.num_batches_tracked": (),
    }


def test_merlin_keys_and_shapes_are_the_inflated_resnet152s():
    """torchvision's ResNet-152 names (layers of 3, 8, 36, 3 bottlenecks) under ``i3_resnet``, inflated: stem
    3x7x7 without bias, 3x3 -> 3x3x3, 1x1 -> 1x1x1; plus ``contrastive_head`` 2048 -> 512 with bias."""
    expected = {"i3_resnet.conv1.weight": (64, 3, 3, 7, 7), **_batch_norm("i3_resnet.bn1", 64)}
    inplanes = 64
    for layer, (blocks, planes) in enumerate(zip((3, 8, 36, 3), (64, 128, 256, 512)), start=1):
        for block in range(blocks):
            prefix = f"i3_resnet.layer{layer}.{block}"
            expected[f"{prefix}.conv1.weight"] = (planes, inplanes, 1, 1, 1)
            expected[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3, 3)
            expected[f"{prefix}.conv3.weight"] = (planes * 4, planes, 1, 1, 1)
            for norm, channels in (("bn1", planes), ("bn2", planes), ("bn3", planes * 4)):
                expected |= _batch_norm(f"{prefix}.{norm}", channels)
            if block == 0:
                expected[f"{prefix}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1, 1)
                expected |= _batch_norm(f"{prefix}.downsample.1", planes * 4)
            inplanes = planes * 4
    expected["i3_resnet.contrastive_head.weight"] = (512, 2048, 1, 1, 1)
    expected["i3_resnet.contrastive_head.bias"] = (512,)
    assert _meta_shapes("Merlin") == expected


def _transformer(prefix: str) -> dict:
    """One CTViT ``Transformer`` (dim 512, 8 heads of 32, GEGLU feed-forward of 1365, PEG, no cross-attention)."""
    expected = {f"{prefix}.norm_out.gamma": (512,), f"{prefix}.norm_out.beta": (512,)}
    for layer in range(4):
        at = f"{prefix}.layers.{layer}"
        expected |= {
            f"{at}.0.dsconv.weight": (512, 1, 3, 3, 3),
            f"{at}.0.dsconv.bias": (512,),
            f"{at}.1.norm.gamma": (512,),
            f"{at}.1.norm.beta": (512,),
            f"{at}.1.context_norm.gamma": (512,),
            f"{at}.1.context_norm.beta": (512,),
            f"{at}.1.null_kv": (8, 0, 32),
            f"{at}.1.to_q.weight": (256, 512),
            f"{at}.1.to_kv.weight": (512, 512),
            f"{at}.1.q_scale": (32,),
            f"{at}.1.k_scale": (32,),
            f"{at}.1.to_out.weight": (512, 256),
            f"{at}.3.0.weight": (512,),
            f"{at}.3.0.bias": (512,),
            f"{at}.3.1.weight": (2730, 512),
            f"{at}.3.4.weight": (512, 1365),
        }
    return expected


def test_ct_clip_keys_and_shapes_are_the_ctvit_encoders():
    """``CTViT(dim=512, codebook_size=8192, image_size=60, patch_size=20, temporal_patch_size=10,
    spatial_depth=4, temporal_depth=4, dim_head=32, heads=8)``: what ``CT-CLIP_v2.pt`` holds under
    ``visual_transformer.`` for the encoder path."""
    expected = {
        "spatial_rel_pos_bias.net.0.0.weight": (512, 2),
        "spatial_rel_pos_bias.net.0.0.bias": (512,),
        "spatial_rel_pos_bias.net.1.0.weight": (512, 512),
        "spatial_rel_pos_bias.net.1.0.bias": (512,),
        "spatial_rel_pos_bias.net.2.weight": (8, 512),
        "spatial_rel_pos_bias.net.2.bias": (8,),
        "to_patch_emb.1.weight": (4000,),
        "to_patch_emb.1.bias": (4000,),
        "to_patch_emb.2.weight": (512, 4000),
        "to_patch_emb.2.bias": (512,),
        "to_patch_emb.3.weight": (512,),
        "to_patch_emb.3.bias": (512,),
        "vq._codebook.embed": (1, 8192, 512),
        **_transformer("enc_spatial_transformer"),
        **_transformer("enc_temporal_transformer"),
    }
    assert _meta_shapes("CTClipVit") == expected


def _random_network(name: str) -> torch.nn.Module:
    """The network with random weights, running statistics and (CT-CLIP) codebook, so that every part
    shapes the embedding."""
    torch.manual_seed(0)
    network = registry.get(name).build().eval()
    with torch.no_grad():
        for key, tensor in network.state_dict().items():
            if key.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif key.endswith("running_mean"):
                tensor.normal_(0, 0.1)
            elif key.endswith("vq._codebook.embed"):  # entries of unequal length, as training leaves them
                tensor.copy_(torch.randn_like(tensor) * torch.rand(*tensor.shape[:-1], 1) / 20)
    return network


@pytest.fixture(scope="module")
def tumor_image():
    image, mask, _ = tumor_ct("lobulated", np.random.default_rng(11), size=(72, 72, 48), spacing=(0.9, 0.9, 1.25))
    return image, from_binary_mask(mask)


@pytest.fixture(scope="module")
def checkpoints_folder(tmp_path_factory):
    """Each model's synthetic checkpoint in its upstream layout, with the network it came from."""
    folder = tmp_path_factory.mktemp("own-networks")
    made = {}
    for name in OWN:
        network = _random_network(name)
        (folder / name).mkdir()
        made[name] = (network, upstream_checkpoint(name, network.state_dict(), folder / name))
    return made


@pytest.mark.parametrize("name", OWN)
def test_a_checkpoint_in_the_upstream_layout_loads_strictly_and_is_what_runs(
    name, checkpoints_folder, tumor_image, nlst, home
):
    network, path = checkpoints_folder[name]
    spec = registry.get(name)
    size = sum(t.numel() * t.element_size() for t in network.state_dict().values())
    assert round(size / 1e6) == spec.encoder_mb
    embedder = Embedder(name, weights=path)
    image, tumor = tumor_image
    prepared = crop(image, tumor.seed, spec.recipe, tumor.mask)
    with torch.inference_mode():
        expected = network(torch.from_numpy(prepared.image)[None, None]).numpy()[0]
    got = embedder.embed(image, tumor)[0]
    np.testing.assert_allclose(got.vector, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(got.vector).max() > 0 and np.isfinite(got.vector).all()
    # the length of the published NLST-Sybil embeddings of this model
    assert got.vector.shape == (nlst.space(name).vectors.shape[1],) == (spec.dimension,)

    again = embedder.embed_crops([prepared])[0]
    np.testing.assert_array_equal(again, got.vector)  # deterministic
    other = crop(image, np.asarray(tumor.seed) + 4.0, spec.recipe)
    batched = embedder.embed_crops([other, prepared])
    np.testing.assert_allclose(batched[1], got.vector, rtol=1e-4, atol=1e-5)  # independent of the batch
    assert not np.allclose(batched[0], got.vector)


def test_merlin_embeddings_are_unit_length_as_in_the_reference(checkpoints_folder, tumor_image, nlst):
    network, _ = checkpoints_folder["Merlin"]
    image, tumor = tumor_image
    prepared = crop(image, tumor.seed, registry.get("Merlin").recipe, tumor.mask)
    with torch.inference_mode():
        vector = network(torch.from_numpy(prepared.image)[None, None])[0].numpy()
    np.testing.assert_allclose(np.linalg.norm(vector), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(nlst.space("Merlin").vectors, axis=1), 1.0, rtol=1e-4)


@pytest.mark.parametrize("name", OWN)
def test_a_checkpoint_missing_a_key_or_holding_a_foreign_one_is_refused_with_the_keys(name, tmp_path):
    state = {k: torch.zeros(v) for k, v in _meta_shapes(name).items()}
    dropped = sorted(state)[3]
    del state[dropped]
    state["extra.weight"] = torch.zeros(2)
    path = upstream_checkpoint(name, state, tmp_path)
    spec = registry.get(name)
    with torch.device("meta"):
        network = spec.build()
    state = checkpoints.encoder_state(checkpoints.read_tensors(path), spec.checkpoint)
    with pytest.raises(SimilarPatientsError) as error:
        checkpoints.load_strict(network, state, str(path))
    assert f"1 missing: {dropped}" in str(error.value) and "1 unexpected: extra.weight" in str(error.value)


def test_a_checkpoint_holding_monai_metatensors_loads_as_plain_tensors(checkpoints_folder, tmp_path, home):
    from monai.data import MetaTensor

    network, _ = checkpoints_folder["CTClipVit"]
    state = {k: MetaTensor(v.clone()) for k, v in network.state_dict().items()}
    embedder = Embedder("CTClipVit", weights=upstream_checkpoint("CTClipVit", state, tmp_path))
    loaded = embedder.encoder.network.state_dict()
    assert all(type(v) is torch.Tensor for v in loaded.values())
    torch.testing.assert_close(loaded["vq._codebook.embed"], network.state_dict()["vq._codebook.embed"])


def test_ct_clip_quantises_by_cosine_similarity_and_returns_the_entry_as_stored():
    from SimilarPatientsLib.models.networks_ctclip import CosineCodebook

    codebook = CosineCodebook(2, 2)
    codebook.embed.copy_(torch.tensor([[[10.0, 0.0], [0.3, 0.4]]]))
    tokens = torch.tensor([[0.8, 0.6], [5.0, 1.0]])  # nearer [0.6, 0.8] in angle; nearer [1, 0]
    assert torch.equal(codebook(tokens), codebook.embed[0][[1, 0]])  # the second entry, then the first


def test_ct_clip_refuses_a_crop_that_is_not_whole_patches():
    network = registry.get("CTClipVit").build()
    with pytest.raises(ValueError, match="60² slices"):
        network(torch.zeros(1, 1, 60, 48, 48))


@pytest.mark.parametrize(("option", "name"), [("Merlin", "Merlin"), ("PASTA", "PASTA"), ("CT-CLIP", "CTClipVit")])
def test_query_nlst_sybil_from_an_image_with_each_model(
    option, name, checkpoints_folder, nlst_home, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(nlst_home))
    image, mask, _ = tumor_ct("spiculated", np.random.default_rng(3), size=(72, 72, 48))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nrrd"))
    _, weights = checkpoints_folder[name]
    command = ["query", "--image", str(tmp_path / "ct.nrrd"), "--mask", str(tmp_path / "mask.nrrd")]
    command += ["--model", option, "--reference", "nlst-sybil", "--weights", str(weights), "-k", "3", "--json"]
    assert main(command) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and all(h["model"] == name for h in hits)
    assert len({h["PatientID"] for h in hits}) == 3
    distances = [h["distance"] for h in hits]
    assert distances == sorted(distances) and all(np.isfinite(distances))


# --- the CT-CLIP recipe: TumorImagingBench orients to LPS, then Spacingd(pixdim=(1.5, 0.75, 0.75)) ---------
TIB_CT_CLIP = {"orient": "SLP", "scale_range": (-1000, 1000), "spatial_size": 60, "pixdim": (1.5, 0.75, 0.75)}
#: The recipe the crop tests used before: 1.5 mm along z.
FORMER = recipes.tumorimagingbench("SLP", (-1000, 1000), 60, (0.75, 0.75, 1.5), (-1.0, 1.0))
_SLOPE = np.array([3.0, 2.0, 5.0])  # HU per mm along LPS x, y, z


def _ramp_ct() -> sitk.Image:
    """HU = 3x + 2y + 5z (LPS mm) on a 0.8 x 0.9 x 1.1 mm grid: trilinear resampling reproduces it exactly."""
    size, spacing, origin = np.array([120, 110, 90]), np.array([0.8, 0.9, 1.1]), np.array([-47.0, -49.0, -48.0])
    index = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1)
    hu = (origin + index * spacing) @ _SLOPE
    image = sitk.GetImageFromArray(hu.transpose(2, 1, 0).astype(np.float32))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(origin.tolist())
    return image


def _independent_ct_clip_crop(seed, seed_index) -> np.ndarray:
    """The CT-CLIP input computed from the TumorImagingBench settings alone: voxel (i, j, k) of the SLP crop
    sits at seed + (i - i0)·0.75 mm toward S, (j - j0)·1.5 mm toward L, (k - k0)·0.75 mm toward P, and holds
    HU / 1000 clipped to [-1, 1]."""
    pixdim_lps = np.asarray(TIB_CT_CLIP["pixdim"])  # after orienting to LPS, pixdim runs along x, y, z
    axes = {"S": 2, "L": 0, "P": 1}
    n = TIB_CT_CLIP["spatial_size"]
    offsets = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), axis=-1) - np.asarray(seed_index)
    position = np.array(seed, dtype=float) + np.zeros((n, n, n, 3))
    for array_axis, letter in enumerate(TIB_CT_CLIP["orient"]):
        lps = axes[letter]
        position[..., lps] += offsets[..., array_axis] * pixdim_lps[lps]
    low, high = TIB_CT_CLIP["scale_range"]
    return np.clip((position @ _SLOPE - low) / (high - low) * 2 - 1, -1, 1)


def test_the_ct_clip_recipe_puts_1_5_mm_along_x_as_the_reference_pipeline_does():
    recipe = registry.get("CTClipVit").recipe
    assert recipe.spacing == TIB_CT_CLIP["pixdim"] and recipe.axes == TIB_CT_CLIP["orient"]
    image, seed = _ramp_ct(), (1.3, -2.2, 0.7)
    corrected = crop(image, seed, recipe)
    independent = _independent_ct_clip_crop(seed, corrected.seed_index)
    np.testing.assert_allclose(corrected.image, independent, atol=1e-4)
    former = crop(image, seed, FORMER)
    assert np.abs(former.image - _independent_ct_clip_crop(seed, former.seed_index)).max() > 0.05
    # one step along the crop's L axis is 1.5 mm of x: 3 HU/mm x 1.5 mm / 1000
    np.testing.assert_allclose(np.diff(corrected.image, axis=1).mean(), 3 * 1.5 / 1000, rtol=1e-3)


def test_the_ct_clip_recipe_equals_tumorimagingbench_monai_transforms_on_any_grid():
    """The MONAI transforms in TumorImagingBench's order (Orientationd LPS, Spacingd, seed crop, Orientationd
    SLP, ScaleIntensityRanged, SpatialPadd) agree with the registry recipe, and not with the former one."""
    image = random_ct(np.eye(3)[:, [2, 0, 1]] * [1, -1, 1], size=(70, 64, 50), spacing=(0.7, 0.8, 1.25))
    seed = np.asarray(image.TransformContinuousIndexToPhysicalPoint([34.2, 31.7, 24.9]))
    recipe = registry.get("CTClipVit").recipe
    reference = tumorimagingbench_pipeline(image, seed, recipe)
    np.testing.assert_allclose(crop(image, seed, recipe).image, reference, atol=1e-5)
    assert np.abs(crop(image, seed, FORMER).image - reference).max() > 0.1
