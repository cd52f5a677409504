"""The encoders are the upstream architectures (same state-dict names and shapes), load each upstream
checkpoint layout strictly, embed deterministically, and their weights are fetched only as they should be."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the embed extra (torch)")
from SimilarPatientsLib import SimilarPatientsError
from SimilarPatientsLib.cli import main
from SimilarPatientsLib.imaging.crop import crop
from SimilarPatientsLib.imaging.tumor import from_binary_mask
from SimilarPatientsLib.models import checkpoints, networks, registry, weights
from SimilarPatientsLib.models.embedder import Embedder
from synthetic_ct import tumor_ct
from synthetic_weights import upstream_checkpoint

pytestmark = pytest.mark.torch

warnings.filterwarnings("ignore", category=FutureWarning)


def shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_fmcib_is_monai_resnet50_width_2_without_classifier():
    state = shapes(networks.fmcib_resnet().state_dict())
    assert state["conv1.weight"] == (128, 1, 7, 7, 7)  # 64 x widen 2, one input channel
    assert state["layer1.0.downsample.0.bias"] == (512,)  # bias_downsample, as FMCIB trained it
    assert state["layer4.2.conv3.weight"][0] == 4096
    assert not [k for k in state if k.startswith("fc.")]
    assert len(state) == 322


def test_ct_fm_encoder_keys_are_those_under_encoder_in_the_ct_fm_segresnet():
    from monai.networks.nets import SegResNetDS

    upstream = SegResNetDS(init_filters=32, in_channels=1, blocks_down=(1, 2, 2, 4, 4)).state_dict()
    encoder = {k[len("encoder.") :]: v for k, v in upstream.items() if k.startswith("encoder.")}
    assert shapes(networks.segres_encoder().state_dict()) == shapes(encoder)


def test_vista3d_encoder_keys_are_those_under_image_encoder_encoder_in_monai_vista3d():
    from monai.networks.nets import vista3d132

    upstream = vista3d132().state_dict()
    prefix = "image_encoder.encoder."
    encoder = {k[len(prefix) :]: v for k, v in upstream.items() if k.startswith(prefix)}
    assert shapes(registry.get("VISTA3D").build().state_dict()) == shapes(encoder)


def test_unet3d_encoder_keys_are_the_models_genesis_names():
    expected = {}
    for name, depth, channels_in in (
        ("down_tr64", 0, 1),
        ("down_tr128", 1, 64),
        ("down_tr256", 2, 128),
        ("down_tr512", 3, 256),
    ):
        width = 32 * 2**depth
        for i, (cin, cout) in enumerate(((channels_in, width), (width, 2 * width))):
            stem = f"{name}.ops.{i}"
            expected[f"{stem}.conv1.weight"] = (cout, cin, 3, 3, 3)
            expected[f"{stem}.conv1.bias"] = (cout,)
            for buffer in ("weight", "bias", "running_mean", "running_var"):
                expected[f"{stem}.bn1.{buffer}"] = (cout,)
            expected[f"{stem}.bn1.num_batches_tracked"] = ()
    for head in ("global", "genesis"):
        assert shapes(networks.UNet3DEncoder(head).state_dict()) == expected


def test_voco_encoder_keys_are_those_of_swin_unetr_v2_swinvit():
    from monai.networks.nets import SwinUNETR

    upstream = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, use_v2=True).swinViT.state_dict()
    assert shapes(networks.SwinEncoder(feature_size=12).state_dict()) == shapes(upstream)


def test_every_network_makes_its_registered_embedding_length():
    crops = {}
    for spec in registry.MODELS.values():
        if spec.build is None or spec.name in ("Voco", "PASTA", "Merlin", "CTClipVit"):
            continue  # VoCo's 295M parameters: covered by the checkpoint test below; our own: test_own_networks
        network = spec.build().eval()
        size = spec.recipe.size
        with torch.inference_mode():
            out = network(torch.rand(2, 1, *size))
        crops[spec.name] = tuple(out.shape)
    assert crops == {
        "FMCIB": (2, 4096),
        "CTFM": (2, 512),
        "VISTA3D": (2, 768),
        "SUPREME": (2, 512),
        "ModelsGen": (2, 4096),
    }


@pytest.fixture(scope="module")
def tumor_image():
    image, mask, _ = tumor_ct("lobulated", np.random.default_rng(11), size=(80, 80, 56), spacing=(0.9, 0.9, 1.25))
    return image, from_binary_mask(mask)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["FMCIB", "CTFM", "VISTA3D", "SUPREME", "ModelsGen", "Voco"])
def test_a_checkpoint_in_the_upstream_layout_loads_strictly_and_is_what_runs(
    name, tmp_path, home, tumor_image, monkeypatch
):
    spec = registry.get(name)
    if spec.weights.size is not None:  # the published file holds more than the encoder made here (ModelsGen:
        # the whole U-Net, 153 MB): its size is checked elsewhere; here the encoder's keys and values are
        spec = dataclasses.replace(spec, weights=dataclasses.replace(spec.weights, size=None))
        monkeypatch.setitem(registry.MODELS, name, spec)
    torch.manual_seed(0)
    original = spec.build().eval()
    size = sum(t.numel() * t.element_size() for t in original.state_dict().values())
    assert round(size / 1e6) == spec.encoder_mb  # what `models list` shows as the least a download holds
    path = upstream_checkpoint(name, original.state_dict(), tmp_path)
    embedder = Embedder(name, weights=path)
    image, tumor = tumor_image
    prepared = crop(image, tumor.seed, spec.recipe, tumor.mask)
    with torch.inference_mode():
        expected = original(torch.from_numpy(prepared.image)[None, None]).numpy()
    got = embedder.embed(image, tumor)[0]
    assert got.vector.shape == (spec.dimension,) and got.model == name and got.recipe == "tumorimagingbench"
    np.testing.assert_allclose(got.vector, expected[0], rtol=1e-4, atol=1e-5)
    assert embedder.load_seconds > 0
    # the worker's embedder, traced and frozen for one crop at a time on the CPU where the trace follows the
    # network without taking a tensor's value for a constant (the others warn so, and stay eager)
    traceable = name in ("FMCIB", "CTFM")
    assert embedder.optimise() == traceable and (embedder.encoder._frozen is not None) == traceable
    np.testing.assert_allclose(embedder.embed(image, tumor)[0].vector, expected[0], rtol=1e-4, atol=1e-5)


def test_a_network_a_trace_cannot_follow_stays_eager_and_two_crops_run_eager(tmp_path, home, tumor_image, monkeypatch):
    torch.manual_seed(0)
    path = upstream_checkpoint("CTFM", registry.get("CTFM").build().state_dict(), tmp_path)
    embedder = Embedder("CTFM", weights=path)
    image, tumor = tumor_image
    eager = embedder.embed(image, [tumor, tumor])
    assert embedder.optimise()
    frozen_calls = []
    frozen = embedder.encoder._frozen
    embedder.encoder._frozen = lambda batch: frozen_calls.append(batch.shape) or frozen(batch)
    again = embedder.embed(image, [tumor, tumor])  # a batch of two: not the traced shape, the eager network
    assert frozen_calls == [] and np.allclose(again[0].vector, eager[0].vector, rtol=1e-5)
    monkeypatch.setattr(torch.jit, "optimize_for_inference", lambda module: lambda x: module(x) * 1.01)
    differing = Embedder("CTFM", weights=path)  # a frozen form whose values are not the network's: not used
    assert not differing.optimise() and differing.encoder._frozen is None
    monkeypatch.setattr(torch.jit, "trace", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("data-dependent")))
    fresh = Embedder("CTFM", weights=path)
    assert not fresh.optimise() and fresh.encoder._frozen is None
    assert np.allclose(fresh.embed(image, tumor)[0].vector, eager[0].vector, rtol=1e-4, atol=1e-6)


def test_strict_loading_lists_missing_unexpected_and_misshapen_keys():
    network = networks.UNet3DEncoder()
    state = dict(network.state_dict())
    state.pop("down_tr64.ops.0.conv1.bias")
    state["down_tr64.ops.0.extra.weight"] = torch.zeros(1)
    state["down_tr128.ops.1.conv1.bias"] = torch.zeros(7)
    with pytest.raises(SimilarPatientsError) as error:
        checkpoints.load_strict(network, state, "x.pt")
    message = str(error.value)
    assert "1 missing: down_tr64.ops.0.conv1.bias" in message
    assert "1 unexpected: down_tr64.ops.0.extra.weight" in message
    assert "1 of another shape: down_tr128.ops.1.conv1.bias (7,) != (128,)" in message


def test_a_foreign_checkpoint_is_refused_by_name(tmp_path, home):
    torch.save({"net": {"module.backbone.down_tr64.ops.0.conv1.weight": torch.zeros(1)}}, tmp_path / "x.pt")
    with pytest.raises(SimilarPatientsError, match="not this model's checkpoint"):
        Embedder("VISTA3D", weights=tmp_path / "x.pt")


def test_corrupt_or_partial_weights_are_refused_with_what_to_do(tmp_path, home):
    torch.manual_seed(0)
    path = upstream_checkpoint("SUPREME", networks.UNet3DEncoder().state_dict(), tmp_path)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(SimilarPatientsError, match="corrupt, partial or not a checkpoint; delete it"):
        Embedder("SUPREME", weights=path)
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(SimilarPatientsError, match="Cannot read the weights"):
        Embedder("SUPREME", weights=path)
    sized = weights.WeightSource("http://x/w.pt", "w.pt", "Apache-2.0", False, size=len(whole))
    (tmp_path / "w.pt").write_bytes(whole[:100])
    with pytest.raises(SimilarPatientsError, match="partial or another file"):
        weights.resolve("SUPREME", sized, tmp_path)


def test_offline_without_weights_says_how_to_supply_them(home, monkeypatch):
    monkeypatch.setitem(
        registry.MODELS, "CTFM", _with_url(registry.MODELS["CTFM"], "http://127.0.0.1:9/model.safetensors")
    )
    with pytest.raises(SimilarPatientsError) as error:
        Embedder("CTFM")
    message = str(error.value)
    assert "looks offline" in message and "--weights" in message and weights.WEIGHTS_DIR_ENV in message


def _with_url(spec, url, size=None):
    import dataclasses

    # a plain URL, not the hub, with no published hash (the test's checkpoint is not the publisher's file)
    source = dataclasses.replace(spec.weights, url=url, size=size, hub=None, known_hash=None)
    return dataclasses.replace(spec, weights=source)


def test_noncommercial_weights_need_acknowledgement_then_a_broken_download_keeps_nothing_and_the_next_caches(
    home, server, tmp_path, monkeypatch
):
    handler, base = server
    torch.manual_seed(0)
    path = upstream_checkpoint("ModelsGen", networks.UNet3DEncoder("genesis").state_dict(), tmp_path)
    data = path.read_bytes()
    handler.files["/Genesis_Chest_CT.pt"] = data
    monkeypatch.setitem(
        registry.MODELS, "ModelsGen", _with_url(registry.MODELS["ModelsGen"], base + "/Genesis_Chest_CT.pt", len(data))
    )
    with pytest.raises(SimilarPatientsError, match=r"non-commercial.*similar-patients models accept ModelsGen"):
        Embedder("ModelsGen")
    assert not weights.weights_dir().joinpath("ModelsGen").exists()  # nothing fetched

    assert main(["models", "accept", "ModelsGen"]) == 0
    handler.cut.append(len(data) // 3)
    with pytest.raises(SimilarPatientsError, match=r"broke off .*nothing was kept\. Run the same command again"):
        Embedder("ModelsGen")
    assert list(weights.weights_dir().joinpath("ModelsGen").iterdir()) == []  # no partial file to load later
    embedder = Embedder("ModelsGen")
    cached = weights.cached_path("ModelsGen", registry.get("ModelsGen").weights)
    assert cached.read_bytes() == data
    handler.files.clear()  # from now on the cache serves
    again = Embedder("ModelsGen")
    image, mask, _ = tumor_ct("smooth", np.random.default_rng(2))
    tumor = from_binary_mask(mask)
    np.testing.assert_array_equal(embedder.embed(image, tumor)[0].vector, again.embed(image, tumor)[0].vector)


def test_accept_licence_flag_records_the_acknowledgement(home, server, tmp_path, monkeypatch):
    handler, base = server
    path = upstream_checkpoint("SUPREME", networks.UNet3DEncoder().state_dict(), tmp_path)
    handler.files["/s.pth"] = path.read_bytes()
    monkeypatch.setitem(registry.MODELS, "SUPREME", _with_url(registry.MODELS["SUPREME"], base + "/s.pth"))
    Embedder("SUPREME", accept_licence=True)
    assert weights.acknowledged("SUPREME")


def test_a_sites_weights_mirror_serves_the_same_file_checked_as_the_publishers(home, server, tmp_path, monkeypatch):
    """``$SIMILARPATIENTS_WEIGHTS_MIRROR/<model>/<file name>`` instead of the publisher's URL, checked as the
    publisher's would be: a mirror's later file that differs from the first download is refused."""
    handler, base = server
    path = upstream_checkpoint("SUPREME", networks.UNet3DEncoder().state_dict(), tmp_path)
    data = path.read_bytes()
    monkeypatch.setitem(
        registry.MODELS, "SUPREME", _with_url(registry.MODELS["SUPREME"], "https://publisher.invalid/s.pth", len(data))
    )
    source = registry.get("SUPREME").weights
    handler.files[f"/site/SUPREME/{source.file_name}"] = data
    monkeypatch.setenv(weights.MIRROR_ENV, base + "/site/")
    assert weights.download_url("SUPREME", source) == f"{base}/site/SUPREME/{source.file_name}"
    Embedder("SUPREME", accept_licence=True)
    assert weights.cached_path("SUPREME", source).read_bytes() == data
    weights.cached_path("SUPREME", source).unlink()
    handler.files[f"/site/SUPREME/{source.file_name}"] = data[:-4] + b"tail"
    with pytest.raises(SimilarPatientsError, match=r"do not match the sha256:[0-9a-f]{64} recorded at the first"):
        Embedder("SUPREME")


def test_without_a_published_hash_the_first_download_is_recorded_and_a_changed_upstream_file_refused(
    home, server, tmp_path, monkeypatch, capsys
):
    handler, base = server
    path = upstream_checkpoint("SUPREME", networks.UNet3DEncoder().state_dict(), tmp_path)
    first = path.read_bytes()
    handler.files["/s.pth"] = first
    monkeypatch.setitem(registry.MODELS, "SUPREME", _with_url(registry.MODELS["SUPREME"], base + "/s.pth"))
    source = registry.get("SUPREME").weights
    assert source.known_hash is None and not source.pinned
    assert weights.recorded_sha256("SUPREME", source) is None
    weights.resolve("SUPREME", source, accept_licence=True)
    recorded = weights.recorded_sha256("SUPREME", source)
    assert recorded == __import__("hashlib").sha256(first).hexdigest()
    assert main(["models", "list", "--json"]) == 0
    rows = {row["model"]: row for row in __import__("json").loads(capsys.readouterr().out)}
    assert rows["SUPREME"]["hash"] == f"recorded {recorded[:10]}…"
    assert rows["SUPREME"]["revision"] == "unpinned URL: the first download's sha256 is recorded"
    assert rows["CTClipVit"]["hash"] == "none published: recorded at first download"
    assert rows["FMCIB"]["revision"] == "pinned: a Zenodo record's file" and rows["TumorDescriptor"]["hash"] == ""

    weights.cached_path("SUPREME", source).unlink()
    handler.files["/s.pth"] = first[:-8] + b"changed!"  # the upstream file was replaced
    with pytest.raises(SimilarPatientsError, match=r"do not match the sha256:.*upstream file changed"):
        weights.resolve("SUPREME", source)
    assert not weights.cached_path("SUPREME", source).exists()


def test_a_pinned_source_with_a_published_hash_says_so():
    import dataclasses

    source = dataclasses.replace(
        registry.get("CTFM").weights,
        hub=weights.HubFile("o/r", "model.safetensors", revision="a" * 40),
        known_hash="sha256:" + "0" * 64,
    )
    assert source.pinned and registry._hash_check("CTFM", source) == "published sha256"
    assert registry.get("FMCIB").weights.pinned  # a Zenodo record file
    assert registry.get("PASTA").weights.url.endswith("/PASTA%20final.pth")
    # the pins found with a public source (the registry names it beside each): commit, size and LFS sha256
    genesis, voco = registry.get("ModelsGen").weights, registry.get("Voco").weights
    assert genesis.pinned and genesis.hub.revision == "4f4e9cbe3a7b8ef5c7813e2d1ac38d23561e1993"
    assert genesis.url.endswith("/resolve/4f4e9cbe3a7b8ef5c7813e2d1ac38d23561e1993/Genesis_Chest_CT.pt")
    assert genesis.known_hash == "sha256:62de21a05236d6a8d8d5b03ec740f6ac6b818d15d3e86eed4f38a2a17d63cc08"
    assert voco.pinned and voco.hub.revision == "c7746ed0a315832f33edcf38c58af10d5bacb120"
    unpinned = [s.name for s in registry.MODELS.values() if s.weights is not None and not s.weights.pinned]
    assert unpinned == ["CTFM", "SUPREME", "PASTA", "Merlin", "CTClipVit"]


def test_weights_folder_from_the_environment_serves_offline_sites(home, tmp_path, monkeypatch):
    (tmp_path / "site" / "SUPREME").mkdir(parents=True)
    upstream_checkpoint("SUPREME", networks.UNet3DEncoder().state_dict(), tmp_path / "site" / "SUPREME")
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path / "site"))
    Embedder("SUPREME")  # no licence prompt and no download: the site's copy is used


def test_embeddings_are_deterministic_and_independent_of_batching(home, tmp_path):
    torch.manual_seed(0)
    path = upstream_checkpoint("SUPREME", networks.UNet3DEncoder().state_dict(), tmp_path)
    embedder = Embedder("SUPREME", weights=path, batch_size=3)
    rng = np.random.default_rng(7)
    cases = [tumor_ct(kind, rng) for kind in ("smooth", "cavitary", "part-solid")]
    together = [embedder.embed(image, from_binary_mask(mask))[0].vector for image, mask, _ in cases]
    prepared = [crop(image, from_binary_mask(mask).seed, embedder.recipe) for image, mask, _ in cases]
    batched = embedder.embed_crops(prepared)
    np.testing.assert_allclose(batched, np.stack(together), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(embedder.embed_crops(prepared), batched)
    reduced = Embedder("SUPREME", weights=path, precision="bf16").embed_crops(prepared)
    assert np.abs(reduced - batched).max() <= 0.05 * np.abs(batched).max()  # bf16 autocast: close, not equal
    with pytest.raises(SimilarPatientsError, match="Precision 'fp8'"):
        Embedder("SUPREME", weights=path, precision="fp8")


def test_out_of_gpu_memory_falls_back_to_cpu(home, tmp_path):
    torch.manual_seed(0)
    path = upstream_checkpoint("SUPREME", networks.UNet3DEncoder().state_dict(), tmp_path)
    embedder = Embedder("SUPREME", weights=path)
    encoder = embedder.encoder
    network = encoder.network

    class Exhausted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = network

        def forward(self, x):
            if x.device.type != "cpu":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.inner(x)

    expected = encoder.forward(np.zeros((1, 1, 48, 48, 48), np.float32))
    encoder.network, encoder.device = Exhausted(), "meta"
    got = encoder.forward(np.zeros((1, 1, 48, 48, 48), np.float32))
    assert embedder.device == "cpu"
    np.testing.assert_array_equal(got, expected)


def test_models_list_shows_licence_size_and_presence(home, tmp_path, capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("FMCIB", "CTFM", "VISTA3D", "SUPREME", "ModelsGen", "Voco", "TumorDescriptor"):
        assert name in out
    assert "NVIDIA OneWay Noncommercial License" in out and "CC BY-NC-SA 4.0" in out
    assert main(["models", "list", "--json"]) == 0
    rows = {row["model"]: row for row in __import__("json").loads(capsys.readouterr().out)}
    assert rows["CTFM"]["weights"] == "no" and rows["TumorDescriptor"]["weights"] == "not needed"
    assert rows["VISTA3D"]["accept"] == "required" and rows["FMCIB"]["weights_MB"] == "≥738"
    upstream_checkpoint("SUPREME", networks.UNet3DEncoder().state_dict(), tmp_path)
    cached = weights.cached_path("SUPREME", registry.get("SUPREME").weights)
    cached.parent.mkdir(parents=True)
    (tmp_path / "supervised_suprem_unet_2100.pth").rename(cached)
    assert main(["models", "list", "--json"]) == 0
    rows = {row["model"]: row for row in __import__("json").loads(capsys.readouterr().out)}
    assert rows["SUPREME"]["weights"] == "yes"


def test_unknown_and_unavailable_models_and_recipes_are_named():
    with pytest.raises(SimilarPatientsError, match="Unknown model 'ResNet'; available: FMCIB"):
        registry.get("ResNet")
    assert registry.get("CT-CLIP").name == registry.get("ctclipvit").name == "CTClipVit"
    assert registry.get("fmcib").with_recipe("fmcib-original").size == (50, 50, 50)
    with pytest.raises(
        SimilarPatientsError, match="FMCIB has no recipe 'x'; it has: tumorimagingbench, fmcib-original"
    ):
        registry.get("FMCIB").with_recipe("x")


def test_one_weight_status_answers_licence_and_download(home, tmp_path, monkeypatch):
    descriptor = weights.status("TumorDescriptor", None)
    assert not descriptor.needs_download and not descriptor.needs_acceptance
    vista = weights.status("VISTA3D", registry.get("VISTA3D").weights)
    assert vista.needs_download and vista.needs_acceptance and vista.present is None
    ct_fm = weights.status("CTFM", registry.get("CTFM").weights)
    assert ct_fm.needs_download and not ct_fm.needs_acceptance  # Apache-2.0: nothing to accept
    weights.acknowledge("VISTA3D")
    assert not weights.status("VISTA3D", registry.get("VISTA3D").weights).needs_acceptance
    (tmp_path / "site" / "SUPREME").mkdir(parents=True)
    upstream_checkpoint("SUPREME", networks.UNet3DEncoder().state_dict(), tmp_path / "site" / "SUPREME")
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path / "site"))
    here = weights.status("SUPREME", registry.get("SUPREME").weights)
    assert here.present is not None and not here.needs_download and not here.needs_acceptance


def test_the_descriptor_is_an_encoder_like_the_networks(home, tumor_image):
    embedder = Embedder("TumorDescriptor")
    image, tumor = tumor_image
    crops = embedder.crops(image, tumor)
    assert embedder.encoder.encode(crops).shape == (1, registry.get("TumorDescriptor").dimension)
    assert embedder.device == "cpu" and embedder.load_seconds == 0.0
    np.testing.assert_array_equal(embedder.embed_crops(crops), embedder.embed(image, tumor)[0].vector[None])


def _supreme_state(change=None) -> dict:
    """SuPreM's encoder weights (seeded), with ``change(name, tensor)`` applied to each parameter."""
    torch.manual_seed(0)
    network = networks.UNet3DEncoder()
    parameters = {name for name, _ in network.named_parameters()}
    state = dict(network.state_dict())
    return {k: change(k, v) if change and k in parameters else v for k, v in state.items()}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_holding_a_nan_or_infinite_value_are_refused_before_any_embedding(home, tmp_path, value):
    def spoil(name, tensor):
        if name == "down_tr128.ops.0.conv1.weight":
            tensor = tensor.clone()
            tensor[3, 2, 1, 1, 1] = value
        return tensor

    path = upstream_checkpoint("SUPREME", _supreme_state(spoil), tmp_path)
    with pytest.raises(
        SimilarPatientsError, match=r"hold NaN or infinite values in 1 of \d+ tensors \(first: down_tr128"
    ):
        Embedder("SUPREME", weights=path)


def test_weights_of_only_zeros_are_refused(home, tmp_path):
    path = upstream_checkpoint("SUPREME", _supreme_state(lambda name, tensor: torch.zeros_like(tensor)), tmp_path)
    with pytest.raises(SimilarPatientsError, match=r"are all zeros: a network that was never trained"):
        Embedder("SUPREME", weights=path)


def test_an_embedding_of_nan_or_zeros_is_refused_naming_its_tumor(home, tmp_path, tumor_image):
    """Finite weights whose activations overflow float32 give NaN for any input: no embedding leaves."""
    path = upstream_checkpoint("SUPREME", _supreme_state(lambda name, tensor: tensor * 1e25), tmp_path)
    embedder = Embedder("SUPREME", weights=path)
    image, tumor = tumor_image
    with pytest.raises(SimilarPatientsError, match=r"SUPREME gave NaN or infinite values for the tumor\(s\) at LPS"):
        embedder.embed(image, tumor)

    class Stub:  # an encoder whose second crop comes out as zeros, its third as NaN
        device, load_seconds = "cpu", 0.0

        def encode(self, crops):
            vectors = np.ones((len(crops), 512), dtype=np.float32)
            vectors[1:2] = 0.0
            vectors[2:3] = np.nan
            return vectors[: len(crops)]

    embedder.encoder = Stub()
    crops = [crop(image, np.add(tumor.seed, shift), embedder.recipe) for shift in ((0, 0, 0), (1, 0, 0), (2, 0, 0))]
    assert embedder.embed_crops(crops[:1]).shape == (1, 512)
    seed = ", ".join(f"{v:.1f}" for v in crops[2].seed)
    with pytest.raises(SimilarPatientsError, match=rf"NaN or infinite values for the tumor\(s\) at LPS \({seed}\) mm"):
        embedder.embed_crops(crops)
    with pytest.raises(SimilarPatientsError, match=r"gave only zeros for the tumor\(s\) at LPS"):
        embedder.embed_crops(crops[:2])


def test_an_empty_or_code_carrying_weights_file_gets_a_whole_sentence_not_torchs_advice(home, tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(SimilarPatientsError, match=r"is empty \(0 bytes\): a download or copy that failed"):
        Embedder("SUPREME", weights=tmp_path / "empty.pth")
    state = _supreme_state()
    torch.save({"net": state, "optimiser": weights.WeightSource("u", "f", "l", False)}, tmp_path / "objects.pth")
    with pytest.raises(SimilarPatientsError) as error:
        Embedder("SUPREME", weights=tmp_path / "objects.pth")
    message = str(error.value)
    assert "holds Python objects (SimilarPatientsLib.models.weights.WeightSource)" in message
    assert "weights_only" not in message and "\x1b" not in message and message.endswith("a machine you trust.")


def test_accepting_a_licence_that_needs_no_acceptance_says_so(home, capsys):
    assert main(["models", "accept", "CTFM"]) == 0
    printed = capsys.readouterr().out
    assert "needs no acceptance: nothing to accept, and nothing was recorded" in printed
    assert "Accepted" not in printed and not weights.acknowledged("CTFM")
    assert main(["models", "accept", "TumorDescriptor"]) == 0
    assert "no licence to accept" in capsys.readouterr().out
