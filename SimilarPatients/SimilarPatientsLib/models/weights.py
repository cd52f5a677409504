"""Model weights: where they come from, their licence, and one call that finds or fetches them.

Weights are looked for, in order: a file or folder the caller gives (offline sites; a ``gs://`` one is
copied once into the cache: how Dataflow workers get them), the folder
``$SIMILARPATIENTS_WEIGHTS_DIR``, the cache under the data home; only then downloaded (resumable, with
progress, verified) from the publisher, or from the site's mirror ``$SIMILARPATIENTS_WEIGHTS_MIRROR`` (a
hospital that reaches no model hub hosts the same files as ``<mirror>/<model>/<file name>``; their size and
digest are checked all the same). Weights under a non-commercial or unconfirmed licence are fetched only after the
user has acknowledged it once (``similar-patients models accept NAME``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SimilarPatientsError
from ..progress import ProgressCallback
from ..util import files
from ..util.atomic import replacing
from ..util.download import Digest, download
from ..util.home import data_home, writing

WEIGHTS_DIR_ENV = "SIMILARPATIENTS_WEIGHTS_DIR"
MIRROR_ENV = "SIMILARPATIENTS_WEIGHTS_MIRROR"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightSource:
    """Where one model's published weights are.

    Args:
        url: the download address.
        file_name: the upstream file name (also the cache file name, and what a given folder must hold).
        licence: the licence as the source states it.
        needs_acknowledgement: True for non-commercial (or unconfirmed) licences.
        size: bytes, once known: a cached or given file of another size is refused.
        sha256: the digest the publisher lists, checked after download. Without one, the digest of the first
            download is recorded and later downloads must match it (a changed upstream file is refused).
    """

    url: str
    file_name: str
    licence: str
    needs_acknowledgement: bool
    size: int | None = None
    sha256: str | None = None

    @property
    def pinned(self) -> bool:
        """The URL names one immutable version (a Hugging Face commit, a Zenodo record file), not a branch."""
        return bool(re.search(r"/resolve/[0-9a-f]{40}/|zenodo\.org/records/\d+/files/", self.url))


def weights_dir() -> Path:
    return data_home() / "weights"


def cached_path(model: str, source: WeightSource) -> Path:
    return weights_dir() / model / source.file_name


def download_url(model: str, source: WeightSource) -> str:
    """Where ``model``'s weights are fetched from: the site's mirror when one is set, else the publisher."""
    mirror = os.environ.get(MIRROR_ENV, "").rstrip("/")
    return f"{mirror}/{model}/{source.file_name}" if mirror else source.url


def find_present(model: str, source: WeightSource) -> Path | None:
    """The weights file already on this machine (``$SIMILARPATIENTS_WEIGHTS_DIR`` or the cache), if any."""
    candidates = []
    if os.environ.get(WEIGHTS_DIR_ENV):
        folder = Path(os.environ[WEIGHTS_DIR_ENV])
        candidates += [folder / model / source.file_name, folder / source.file_name]
    candidates.append(cached_path(model, source))
    return next((p for p in candidates if p.is_file()), None)


@dataclass(frozen=True)
class WeightStatus:
    """What using one model takes now: nothing, a licence acceptance, a download, or none of these
    because its weights are here. The CLI's ``models list``, :func:`resolve` and the Slicer module all ask
    this one question through :func:`status`."""

    model: str
    source: WeightSource | None  #: None: the model needs no weights
    present: Path | None  #: the weights file on this machine
    accepted: bool  #: the user accepted the licence (``models accept``)

    @property
    def needs_acceptance(self) -> bool:
        """The licence must be accepted before the weights may be downloaded."""
        return self.needs_download and self.source.needs_acknowledgement and not self.accepted

    @property
    def needs_download(self) -> bool:
        return self.source is not None and self.present is None


def status(model: str, source: WeightSource | None) -> WeightStatus:
    """Where ``model``'s weights stand on this machine."""
    if source is None:
        return WeightStatus(model, None, None, False)
    return WeightStatus(model, source, find_present(model, source), acknowledged(model))


def acknowledged(model: str) -> bool:
    return model in _acknowledgements()


def acknowledge(model: str) -> None:
    """Record that the user accepted ``model``'s weight licence (kept in the data home)."""
    accepted = _acknowledgements()
    accepted[model] = True
    path = weights_dir() / "licences-accepted.json"
    with writing("the licence acceptance"), replacing(path) as temporary:
        temporary.write_text(json.dumps(accepted, indent=1, sort_keys=True), encoding="utf-8")


def resolve(
    model: str,
    source: WeightSource | None,
    given: Path | str | None = None,
    accept_licence: bool = False,
    progress: ProgressCallback | None = None,
) -> Path | None:
    """The path of ``model``'s weights (None for a model without weights): ``given`` (a file, or a folder
    holding the upstream file name), a copy already present, or a fresh download once the licence is
    acknowledged."""
    if source is None:
        return None
    if given is not None and files.is_url(str(given)):
        return _from_bucket(model, source, str(given))
    if given is not None:
        path = Path(given)
        if path.is_dir():
            path = path / source.file_name
        if not path.is_file():
            raise SimilarPatientsError(f"The weights {path} do not exist (expected the file {source.file_name}).")
        return _checked_size(path, source)
    state = status(model, source)
    if state.present is not None:
        log.info("%s weights: %s", model, state.present)
        return _checked_size(state.present, source)
    if state.needs_acceptance and not accept_licence:
        raise SimilarPatientsError(
            f"{model}'s weights are published under '{source.licence}'. Read it, then accept it once with "
            f"`similar-patients models accept {model}` (or pass --accept-licence); nothing is downloaded "
            f"before that."
        )
    if accept_licence:
        acknowledge(model)
    expected = source.sha256 or recorded_sha256(model, source)
    digest = Digest("sha256", expected) if expected else None
    url = download_url(model, source)
    log.info("%s weights: downloading %s", model, url)
    try:
        path = download(url, cached_path(model, source), digest, progress)
    except SimilarPatientsError as error:
        raise SimilarPatientsError(
            f"{model}'s weights are not on this machine and could not be fetched: {error} Offline, copy "
            f"{source.file_name} from {url} and pass it with --weights (or put it in "
            f"${WEIGHTS_DIR_ENV})."
        ) from error
    path = _checked_size(path, source)
    if expected is None:
        _record_sha256(model, source, Digest("sha256", "").of_file(path))
    return path


def _from_bucket(model: str, source: WeightSource, url: str) -> Path:
    """Weights given as ``gs://…/file`` (or a ``gs://…/`` folder holding the upstream file name): copied
    once into this machine's cache (a Dataflow worker's), by the URL's digest, then used from there."""
    if url.endswith("/"):
        url += source.file_name
    local = weights_dir() / model / "from-bucket" / hashlib.sha256(url.encode()).hexdigest()[:16] / files.name(url)
    if not local.is_file():
        if not files.exists(url):
            raise SimilarPatientsError(f"The weights {url} do not exist (expected the file {source.file_name}).")
        log.info("%s weights: copying %s to %s", model, url, local)
        with writing(f"{model}'s weights from {url}"):
            files.copy_to_local(url, local)
    return _checked_size(local, source)


def recorded_sha256(model: str, source: WeightSource) -> str | None:
    """The sha256 of ``model``'s first download from ``source``'s URL, where the publisher lists none."""
    return _recorded().get(model, {}).get(source.url)


def _record_sha256(model: str, source: WeightSource, sha256: str) -> None:
    recorded = _recorded()
    recorded.setdefault(model, {})[source.url] = sha256
    log.info("%s weights: no published sha256; recorded %s of the first download", model, sha256)
    with writing("the recorded weight digests"), replacing(_recorded_path()) as temporary:
        temporary.write_text(json.dumps(recorded, indent=1, sort_keys=True), encoding="utf-8")


def _recorded_path() -> Path:
    return weights_dir() / "recorded-sha256.json"


def _recorded() -> dict:
    path = _recorded_path()
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _checked_size(path: Path, source: WeightSource) -> Path:
    if source.size is not None and path.stat().st_size != source.size:
        raise SimilarPatientsError(
            f"{path} has {path.stat().st_size} bytes but the published file has {source.size}: it is partial or "
            f"another file. Delete it and fetch it again."
        )
    return path


def _acknowledgements() -> dict:
    path = weights_dir() / "licences-accepted.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
