"""The Beam stages of a reference build: read a series and crop its lesions for every model's recipe, embed
batches of crops with ``RunInference`` and our model handler around the library's :class:`Embedder`, and
write Parquet shards and dead letters.

Beam comes with the ``pipeline`` extra (Python >= 3.10); like ``models/networks.py`` this module subclasses
the package's classes at import, so it is imported only by a build.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import SimilarPatientsError
from ..imaging.crop import crop
from ..imaging.ct_image import read_ct
from ..imaging.recipes import Recipe
from ..imaging.tumor import Tumor, from_box, from_mask, from_point
from ..util.optional import optional_import
from . import shards
from .annotations import slice_point
from .fetch import SeriesSource
from .manifest import Lesion

beam = optional_import("apache_beam", "pipeline")
inference = optional_import("apache_beam.ml.inference.base", "pipeline")

NAMESPACE = "similar_patients"
DEAD = "dead"
_READ_MS = beam.metrics.Metrics.distribution(NAMESPACE, "read_ms")
_CROP_MS = beam.metrics.Metrics.distribution(NAMESPACE, "crop_ms")
_EMBED_MS = beam.metrics.Metrics.distribution(NAMESPACE, "embed_ms")
_WRITE_MS = beam.metrics.Metrics.distribution(NAMESPACE, "write_ms")
ROWS, DEAD_LETTERS = "rows_written", "dead_letters"
_ROWS = beam.metrics.Metrics.counter(NAMESPACE, ROWS)
_DEAD_LETTERS = beam.metrics.Metrics.counter(NAMESPACE, DEAD_LETTERS)


def crops_tag(model: str) -> str:
    return f"crops-{model}"


def read_image(source: str, is_series: bool, series: SeriesSource):
    """The CT of a lesion (validated) and the files of its series (none for an image file)."""
    if not is_series:
        return read_ct(source), []
    files = series.files(source)
    if not files:
        raise SimilarPatientsError(f"Series {source} has no files.")
    return read_ct(files[0]), files


def lesion_tumor(lesion: Lesion, files: Sequence[Path], series: SeriesSource) -> Tumor:
    """The lesion's mark as a :class:`Tumor` in LPS mm (SEG segments fetched like a series)."""
    mark = lesion.mark
    if mark.kind == "seed":
        return from_point(mark.values)
    if mark.kind == "box":
        return from_box(mark.values[:3], mark.values[3:])
    if mark.kind == "mask":
        return from_mask(mark.path, mark.segment or None)
    if mark.kind == "seg":
        seg_files = series.files(mark.series)
        try:
            return from_mask(seg_files[0], int(mark.segment))
        finally:
            series.release(mark.series)
    return from_point(slice_point(_slice(files, mark.sop), mark.values))


def _slice(files: Sequence[Path], sop: str):
    pydicom = optional_import("pydicom", "embed")
    for path in files:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        if str(header.SOPInstanceUID) == sop:
            return header
    raise SimilarPatientsError(f"The box is drawn on image {sop}, which is not in its CT series.")


class ReadAndCrop(beam.DoFn):
    """(CT source, [(lesion, models)]) -> one crop per lesion per model, tagged by model; a series or lesion
    that fails goes to the dead letters with its reason, and the others go on."""

    def __init__(self, recipes: dict[str, Recipe], series: SeriesSource):
        self.recipes, self.series = recipes, series

    def process(self, element):
        source, lesions = element
        is_series = bool(lesions[0][0].series)
        start = time.perf_counter()
        try:
            image, files = read_image(source, is_series, self.series)
        except Exception as error:  # any failure of one series is that series' dead letter
            for lesion, models in lesions:
                for model in models:
                    yield beam.pvalue.TaggedOutput(DEAD, shards.dead_letter(lesion, model, "read", error))
            return
        _READ_MS.update(int(1000 * (time.perf_counter() - start)))
        try:
            for lesion, models in lesions:
                start = time.perf_counter()
                try:
                    tumor = lesion_tumor(lesion, files, self.series)
                    made = [(m, crop(image, tumor.seed, self.recipes[m], tumor.mask, tumor.box)) for m in models]
                except Exception as error:
                    for model in models:
                        yield beam.pvalue.TaggedOutput(DEAD, shards.dead_letter(lesion, model, "crop", error))
                    continue
                _CROP_MS.update(int(1000 * (time.perf_counter() - start)))
                for model, made_crop in made:
                    yield beam.pvalue.TaggedOutput(crops_tag(model), (lesion, made_crop))
        finally:
            if is_series:
                self.series.release(source)


class EmbedderHandler(inference.ModelHandler):
    """A Beam model handler around the library's :class:`Embedder`: the model is loaded once per worker
    (CUDA when the worker has it, ``device``), and each batch of crops is one call of the encoder."""

    def __init__(
        self,
        model: str,
        recipe: str,
        weights: str | None = None,
        accept_licence: bool = False,
        device: str | None = None,
        batch_size: int = 8,
        precision: str = "fp32",
    ):
        super().__init__()
        self.model, self.recipe, self.weights = model, recipe, weights
        self.accept_licence, self.device, self.batch_size, self.precision = (
            accept_licence,
            device,
            batch_size,
            precision,
        )

    def load_model(self):
        from ..models.embedder import Embedder

        return Embedder(
            self.model,
            self.recipe,
            self.weights,
            self.accept_licence,
            self.device,
            batch_size=self.batch_size,
            precision=self.precision,
        )

    def run_inference(self, batch, model, inference_args=None):
        """Embeddings of a batch of crops; a crop the encoder refuses (a bad input, not a failing machine)
        gets its error as its result, so that it alone becomes a dead letter."""
        start = time.perf_counter()
        crops = list(batch)
        try:
            vectors = list(model.embed_crops(crops))
        except SimilarPatientsError:
            vectors = [_embed_one(model, c) for c in crops]
        _EMBED_MS.update(int(1000 * (time.perf_counter() - start)))
        return [inference.PredictionResult(c, v, self.model) for c, v in zip(crops, vectors)]

    def batch_elements_kwargs(self):
        return {"min_batch_size": 1, "max_batch_size": self.batch_size}

    def get_metrics_namespace(self) -> str:
        return NAMESPACE

    def share_model_across_processes(self) -> bool:
        return False


class WriteShard(beam.DoFn):
    """A batch of rows -> one Parquet shard, written atomically; yields the shard's path and row count."""

    def __init__(self, folder: str, columns):
        self.folder, self.columns = folder, columns

    def process(self, rows):
        start = time.perf_counter()
        path = shards.write_shard(rows, self.folder, self.columns)
        _WRITE_MS.update(int(1000 * (time.perf_counter() - start)))
        _ROWS.inc(len(rows))
        yield path, len(rows)


class WriteDeadLetters(beam.DoFn):
    def __init__(self, folder: str):
        self.folder = folder

    def process(self, records):
        _DEAD_LETTERS.inc(len(records))
        yield shards.write_dead_letters(records, self.folder), len(records)


def _embed_one(model, one_crop):
    try:
        return model.embed_crops([one_crop])[0]
    except SimilarPatientsError as error:
        return error


def rows_or_dead_letters(keyed, model: str, recipe: str):
    """A reference row per embedded lesion; a dead letter for a crop the encoder refused."""
    lesion, prediction = keyed
    if isinstance(prediction.inference, BaseException):
        yield beam.pvalue.TaggedOutput(DEAD, shards.dead_letter(lesion, model, "embed", prediction.inference))
    else:
        yield shards.row(lesion, model, recipe, prediction.example.seed, prediction.inference)


def failed_batch(failed, model: str):
    """The lesions of a batch whose inference failed as a whole (Beam's failed-inference output: the
    batch and the exception, or its type, text and traceback) as dead letters."""
    batch, error = failed
    if not isinstance(error, BaseException):
        error = RuntimeError(error[1] if isinstance(error, tuple) else str(error))
    for element in batch:
        yield shards.dead_letter(element[0], model, "embed", error)
