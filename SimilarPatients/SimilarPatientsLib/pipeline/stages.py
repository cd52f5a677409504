"""The Beam stages of a reference build: read a series and crop its lesions for every model's recipe, embed
batches of crops with ``RunInference`` and our model handler around the library's :class:`Embedder`, and
write Parquet shards and dead letters.

Beam comes with the ``pipeline`` extra (Python >= 3.10); like ``models/networks.py`` this module subclasses
the package's classes at import, so it is imported only by a build.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
import zlib
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
    """The CT of a lesion (validated) and the files of its series (none for an image file). A series whose
    files lie in several folders is read from all of them (linked into one folder for the reader)."""
    if not is_series:
        return read_ct(source), []
    files = series.files(source)
    if not files:
        raise SimilarPatientsError(f"Series {source} has no files.")
    if len({Path(f).parent for f in files}) == 1:
        return read_ct(files[0]), files
    with tempfile.TemporaryDirectory(prefix="similar-patients-series-") as folder:
        for number, path in enumerate(files):
            os.symlink(Path(path).resolve(), Path(folder, f"{number:06d}-{Path(path).name}"))
        return read_ct(folder), files


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
        source, lesions = element[0], list(element[1])
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
    process (CUDA when the worker has it, ``device``), and each batch of crops is one call of the encoder.
    With ``share`` (GPU workers) one model serves every SDK process of a worker: Dataflow runs one process
    per vCPU, and each would otherwise load its own copy into the one GPU."""

    def __init__(
        self,
        model: str,
        recipe: str,
        weights: str | None = None,
        accept_licence: bool = False,
        device: str | None = None,
        batch_size: int = 8,
        precision: str = "fp32",
        share: bool = False,
    ):
        super().__init__()
        self.share = share
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
        return self.share


class WriteShard(beam.DoFn):
    """A group of rows (fixed by the ``GroupByKey`` before it) -> one Parquet shard named by its lesions,
    so a retried write rewrites the same file; yields the shard's path and row count."""

    def __init__(self, folder: str, columns, build: str):
        self.folder, self.columns, self.build = folder, columns, build

    def process(self, group):
        rows = list(group[1])
        start = time.perf_counter()
        path = shards.write_shard(rows, self.folder, self.columns, self.build)
        _WRITE_MS.update(int(1000 * (time.perf_counter() - start)))
        _ROWS.inc(len(rows))
        yield path, len(rows)


def keyed_by_lesion(row: dict, groups: int) -> tuple[int, dict]:
    """A row keyed by its shard group: a stable hash of its lesion, the same on every worker and retry. The
    return hint is a (key, value) pair: Beam 2.78 checks it against ``GroupByKey`` (a bare ``tuple`` is refused)."""
    text = f"{row['PatientID']}\t{row['lesion_id']}".encode()
    return zlib.crc32(text) % groups, row


def inference_handler(model, recipe, weights, accept_licence, device, batch_size, precision, share=False):
    """Our model handler, keyed by lesion, so each embedding comes back with its lesion."""
    handler = EmbedderHandler(model, recipe, weights, accept_licence, device, batch_size, precision, share)
    return inference.KeyedModelHandler(handler)


def explained(error: BaseException, out: str) -> SimilarPatientsError:
    """A failed run as one clear error: a worker's :class:`SimilarPatientsError` (Beam wraps it, with its
    traceback, in another exception), a full disk, or what Beam said."""
    text = str(error)
    ours = SimilarPatientsError.__name__ + ": "
    if ours in text:
        said = text.rsplit(ours, 1)[1].split(" [while running")[0].strip().splitlines()[0]
        return SimilarPatientsError(said)
    cause = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            break
        cause = cause.__cause__ or cause.__context__
    if cause is not None or "No space left on device" in text:
        return SimilarPatientsError(
            f"The disk filled up during the build (No space left on device) writing {out} or a worker's series "
            f"cache. Nothing written is damaged: free space (or choose --out/--cache elsewhere) and run the same "
            f"command again; it keeps what was built and embeds the rest."
        )
    last = text.strip().splitlines()[-1] if text.strip() else type(error).__name__
    return SimilarPatientsError(f"The build failed in Beam: {last[:500]}")


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
