"""The registry of embedding models: architecture, recipe, embedding length, weights and licence.

Names are those of the NLST-Sybil reference's models, so that a query embeds exactly as the reference
was built. An entry is data: the encoder class and its arguments (network builder, checkpoint layout,
weight source), the recipe and the embedding length. ``TumorDescriptor`` needs no weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING

from ..errors import SimilarPatientsError
from ..imaging import recipes
from ..imaging.recipes import Recipe
from ..util.model_names import ALIASES, canonical
from . import descriptor, weights
from .checkpoints import CheckpointFormat
from .encoders import NetworkEncoder
from .weights import WeightSource

if TYPE_CHECKING:
    import pandas as pd

_NONCOMMERCIAL = True


def _network(builder: str, module: str = "networks", **arguments) -> Callable:
    """A builder that imports torch (and MONAI) only when a network is built (``models list`` needs neither):
    ``builder`` in ``module`` (``networks`` for MONAI-based encoders, ``networks_<family>`` for our own)."""

    def build():
        return getattr(import_module(f".{module}", __package__), builder)(**arguments)

    return build


@dataclass(frozen=True)
class ModelSpec:
    """One embedding model.

    Args:
        name: the model's name in references.
        recipe: the preprocessing its embeddings were made with.
        dimension: the embedding length.
        build: returns the network (None for the weight-free descriptor).
        checkpoint: how the upstream weights file holds the network.
        weights: where the weights come from (None: weight-free).
        description: one line for ``models list``.
        encoder: the class that turns crops into embeddings (:class:`NetworkEncoder` for networks).
        encoder_mb: the encoder's float32 weights in MB (a test checks it against the network): what a
            download holds at least (the upstream file may add a decoder or heads).
        other_recipes: further recipes the same network can be run with (e.g. FMCIB's own).
    """

    name: str
    recipe: Recipe
    dimension: int
    build: Callable | None
    checkpoint: CheckpointFormat | None
    weights: WeightSource | None
    description: str
    encoder_mb: int = 0
    other_recipes: tuple[Recipe, ...] = field(default=())
    encoder: Callable = NetworkEncoder

    def with_recipe(self, name: str | None) -> Recipe:
        """The recipe called ``name`` (the model's reference recipe when None)."""
        if name is None:
            return self.recipe
        for recipe in (self.recipe, *self.other_recipes):
            if recipe.name == name:
                return recipe
        known = ", ".join(r.name for r in (self.recipe, *self.other_recipes))
        raise SimilarPatientsError(f"{self.name} has no recipe '{name}'; it has: {known}.")


def _hugging_face(
    repo: str, file: str, licence: str, needs_acknowledgement: bool, revision: str = "main", **verified
) -> WeightSource:
    """A weights file in a Hugging Face repository (``datasets/<repo>`` for a dataset), at ``revision``: a
    commit pins the file (each pin below names the public page that shows it); ``main`` leaves it unpinned:
    the first download's commit is recorded and later downloads ask for it (``models list`` says which,
    ``models download MODEL --revision REV`` pins another). ``verified``: ``size`` and ``known_hash`` where the
    hub lists them (its Git LFS pointer's ``oid sha256``)."""
    dataset = repo.startswith("datasets/")
    hub = weights.HubFile(repo.split("/", 1)[1] if dataset else repo, file, "dataset" if dataset else "model", revision)
    return WeightSource(hub.url, file.rsplit("/", 1)[-1], licence, needs_acknowledgement, hub=hub, **verified)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "FMCIB",
            recipes.tumorimagingbench("SPL"),
            4096,
            _network("fmcib_resnet"),
            CheckpointFormat(containers=("trunk_state_dict", "state_dict"), prefixes=("model.trunk.", "")),
            # A Zenodo record's file (a record's files cannot be replaced); no hash found published beside it:
            # the first download's sha256 is recorded.
            WeightSource(
                "https://zenodo.org/records/10528450/files/model_weights.torch?download=1",
                "model_weights.torch",
                "as stated on Zenodo record 10528450",
                needs_acknowledgement=False,
            ),
            "FMCIB: MONAI 3D ResNet-50 (width x2), self-supervised on 11k CT lesions",
            738,
            other_recipes=(recipes.FMCIB_ORIGINAL,),
        ),
        ModelSpec(
            "CTFM",
            recipes.tumorimagingbench("SPL"),
            512,
            _network("segres_encoder"),
            CheckpointFormat(prefixes=("encoder.", "model.encoder.", "")),
            _hugging_face(
                "project-lighter/ct_fm_feature_extractor",
                "model.safetensors",
                "Apache-2.0",
                needs_acknowledgement=False,
                # Unpinned: the stored pages of the repository show only the short commit 527b0d1 (its tree,
                # "Update README.md (#1)"), no full commit or the file's sha256.
            ),
            "CT-FM: MONAI SegResEncoder, self-supervised on 148k CT scans",
            311,
        ),
        ModelSpec(
            "VISTA3D",
            recipes.tumorimagingbench("RAS"),
            768,
            _network("segres_encoder", init_filters=48, norm="instance"),
            CheckpointFormat(containers=("state_dict",), prefixes=("image_encoder.encoder.",)),
            WeightSource(
                "https://developer.download.nvidia.com/assets/Clara/monai/tutorials/model_zoo/model_vista3d.pt",
                "model_vista3d.pt",
                "NVIDIA OneWay Noncommercial License",
                _NONCOMMERCIAL,
                # The md5 MONAI's model zoo lists for this URL: Project-MONAI/model-zoo, models/vista3d/
                # large_files.yml (commit 7c83ec039fc853d6bfe5f5ff0d3a3e48812e22eb, 2024-09-23, and later).
                known_hash="md5:6ce45a8edde4400c5d28d5e74d7b61d5",
            ),
            "VISTA3D image encoder (MONAI SegResEncoder, 48 filters), segmentation foundation model",
            700,
        ),
        ModelSpec(
            "SUPREME",
            recipes.tumorimagingbench("RAS"),
            512,
            _network("UNet3DEncoder"),
            CheckpointFormat(
                containers=("net", "state_dict"), prefixes=("module.backbone.", "backbone."), ignore=("up_tr", "out_tr")
            ),
            _hugging_face(
                "MrGiovanni/SuPreM",
                "supervised_suprem_unet_2100.pth",
                "SuPreM weights: non-commercial research use (see the source page)",
                _NONCOMMERCIAL,
                # Unpinned: the stored pages show commits d578cce (Upload 3 files) and 1620408 (Upload 9 files,
                # not this one), but none shows which commit holds this file, nor its sha256.
            ),
            "SuPreM: 3D U-Net encoder, supervised on AbdomenAtlas (2,100 CTs)",
            28,
        ),
        ModelSpec(
            "ModelsGen",
            recipes.tumorimagingbench("RAS"),
            4096,
            _network("UNet3DEncoder", head="genesis"),
            CheckpointFormat(containers=("state_dict",), prefixes=("module.", ""), ignore=("up_tr", "out_tr")),
            _hugging_face(
                "MrGiovanni/ModelsGenesis",
                "Genesis_Chest_CT.pt",
                "Models Genesis: non-commercial research use (see the source page)",
                _NONCOMMERCIAL,
                # The commit that added the file, and its Git LFS pointer: huggingface.co/MrGiovanni/
                # ModelsGenesis/commit/4f4e9cbe3a7b8ef5c7813e2d1ac38d23561e1993 ("Upload 3 files"); the file's
                # page on main (blob/main/Genesis_Chest_CT.pt) shows the same commit and SHA256.
                revision="4f4e9cbe3a7b8ef5c7813e2d1ac38d23561e1993",
                size=152639120,
                known_hash="sha256:62de21a05236d6a8d8d5b03ec740f6ac6b818d15d3e86eed4f38a2a17d63cc08",
            ),
            "Models Genesis: 3D U-Net encoder, self-supervised on chest CT",
            28,
        ),
        ModelSpec(
            "Voco",
            recipes.tumorimagingbench("RAS", size=64),
            3072,
            _network("SwinEncoder"),
            CheckpointFormat(
                containers=("state_dict", "model"), prefixes=("swinViT.", "module.swinViT.", "backbone.swinViT.")
            ),
            _hugging_face(
                "Luffy503/VoCo",
                "VoCo_H_SSL_head.pt",
                "not confirmed offline: read the source page before use",
                needs_acknowledgement=True,
                # The commit that uploaded the file: huggingface.co/Luffy503/VoCo/tree/
                # c7746ed0a315832f33edcf38c58af10d5bacb120 ("Upload VoCo_H_SSL_head.pt"); its Git LFS SHA256
                # from the file's page (blob/main/VoCo_H_SSL_head.pt, last changed in c7746ed).
                revision="c7746ed0a315832f33edcf38c58af10d5bacb120",
                known_hash="sha256:a88216d079191bf7c81319ab468e0f45a0c2e7d3eb46f5964f34a3e1e6a6f4a3",
            ),
            "VoCo-H: MONAI Swin transformer (SwinUNETR v2, 192 features), self-supervised on 160k CTs",
            1187,
        ),
        ModelSpec(
            "PASTA",
            recipes.tumorimagingbench("LPS"),
            1024,
            _network("PastaEncoder", module="networks_pasta"),
            CheckpointFormat(
                containers=("state_dict", "model"),
                prefixes=("module.", ""),
                ignore=("conv_blocks_localization.", "tu.", "seg_outputs.", "head."),
            ),
            _hugging_face(
                "surajpaib/PASTA-Model",
                "PASTA final.pth",
                "MIT per the authors' code (LWHYC/PASTA); weights card unconfirmed",
                needs_acknowledgement=True,
                # Unpinned: no stored page or code names a commit of surajpaib/PASTA-Model.
            ),
            "PASTA: nnU-Net-style 3D U-Net encoder (1024 channels), pretrained on synthetic CT lesions",
            453,
        ),
        ModelSpec(
            "Merlin",
            recipes.tumorimagingbench("RAS", window=(-1000.0, 1000.0)),
            512,
            _network("MerlinImageEncoder", module="networks_merlin"),
            CheckpointFormat(prefixes=("encode_image.",), ignore=("i3_resnet.classifier.",)),
            _hugging_face(
                "stanfordmimi/Merlin",
                "i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt",
                "MIT per the authors' code (merlin-vlm); weights card unconfirmed",
                needs_acknowledgement=True,
                # Unpinned: Merlin's own code (merlin/utils) downloads from main; no stored page names a commit.
            ),
            "Merlin: I3D ResNet-152 image encoder and contrastive head, CT-report-EHR pretraining",
            474,
        ),
        ModelSpec(
            "CTClipVit",
            recipes.tumorimagingbench("SLP", (-1000.0, 1000.0), 60, (1.5, 0.75, 0.75), (-1.0, 1.0)),
            512,
            _network("CTViTEncoder", module="networks_ctclip"),
            CheckpointFormat(
                prefixes=("visual_transformer.",),
                ignore=(
                    "to_patch_emb_first_frame.",
                    "dec_spatial_transformer.",
                    "dec_temporal_transformer.",
                    "to_pixels_first_frame.",
                    "to_pixels.",
                    "vgg.",
                    "discr.",
                    "vq._codebook.initted",
                    "vq._codebook.cluster_size",
                    "vq._codebook.embed_avg",
                    "vq._codebook.batch_mean",
                    "vq._codebook.batch_variance",
                ),
            ),
            _hugging_face(
                "datasets/ibrahimhamamci/CT-RATE",
                "models/CT-CLIP-Related/CT-CLIP_v2.pt",
                "CC BY-NC-SA 4.0 (CT-RATE; gated: accept its terms)",
                _NONCOMMERCIAL,
                # Unpinned: a gated dataset whose pages (and CT-CLIP's code) name only main.
            ),
            "CT-CLIP: CTViT image encoder (factorised spatial/temporal transformer), CT-report contrastive",
            111,
        ),
        ModelSpec(
            "TumorDescriptor",
            descriptor.RECIPE,
            descriptor.DIMENSION,
            None,
            None,
            None,
            "weight-free baseline: size, shape, intensity and texture of the tumor (SimpleITK/numpy)",
            encoder=descriptor.DescriptorEncoder,
        ),
    )
}


def get(name: str) -> ModelSpec:
    """The model called ``name`` (any case, or a documented alias), or an error that lists what there is."""
    model = canonical(name)
    if model is None:
        known = ", ".join(f"{m} ({', '.join(a)})" if a else m for m, a in ALIASES.items())
        raise SimilarPatientsError(f"Unknown model '{name}'; available: {known}.")
    return MODELS[model]


def summary() -> pd.DataFrame:
    """One row per model: embedding length, recipe, licence, weights size and whether they are here."""
    rows = []
    for spec in MODELS.values():
        state = weights.status(spec.name, spec.weights)
        source = state.source
        rows.append(
            {
                "model": spec.name,
                "also": ", ".join(ALIASES[spec.name]),
                "dim": spec.dimension,
                "recipes": ", ".join(r.name for r in (spec.recipe, *spec.other_recipes)),
                "licence": "none (no weights)" if source is None else source.licence,
                "accept": "required"
                if state.needs_acceptance
                else "accepted"
                if source is not None and source.needs_acknowledgement and state.accepted
                else "",
                "weights_MB": ""
                if source is None
                else f"≥{spec.encoder_mb}"
                if source.size is None
                else f"{source.size / 1e6:.0f}",
                "weights": "not needed" if source is None else "yes" if state.present else "no",
                "hash": "" if source is None else _hash_check(spec.name, source),
                "revision": "" if source is None else weights.revision(spec.name, source),
            }
        )
    import pandas as pd  # the registry itself needs only numpy (the Slicer module asks it before any install)

    return pd.DataFrame(rows)


def _hash_check(model: str, source: WeightSource) -> str:
    """What a download is checked against: the publisher's hash, or (none published) the first download's
    sha256, recorded then."""
    if source.known_hash:
        return f"published {source.known_hash.split(':')[0]}"
    recorded = weights.recorded_sha256(model, source)
    return f"recorded {recorded[:10]}…" if recorded else "none published: recorded at first download"
