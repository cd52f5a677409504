"""Model weights: where they come from, their licence, and one call that finds or fetches them.

Weights are looked for, in order: a file or folder the caller gives (offline sites; a ``gs://`` one is
copied once into the cache: how Dataflow workers get them), the folder ``$SIMILARPATIENTS_WEIGHTS_DIR``,
the cache under the data home (where ``models import`` puts a file), the Hugging Face cache; only then
downloaded. Weights on the Hugging Face hub come through ``huggingface_hub`` (the user's token from
``huggingface-cli login`` or ``$HF_TOKEN``, which gated repositories need; the shared Hugging Face cache;
``$HF_ENDPOINT`` for a hub mirror); others through :func:`..util.download.download` (resumable, with
progress); all are verified. A site that reaches no hub can also serve the same files as
``<mirror>/<model>/<file name>`` (``$SIMILARPATIENTS_WEIGHTS_MIRROR``). Weights under a non-commercial or
unconfirmed licence are fetched only after the user has accepted it once (``similar-patients models accept``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from ..errors import SimilarPatientsError
from ..progress import ProgressCallback, report
from ..util import files
from ..util.atomic import replacing
from ..util.download import Digest, download
from ..util.home import data_home, writing
from ..util.optional import optional_import

WEIGHTS_DIR_ENV = "SIMILARPATIENTS_WEIGHTS_DIR"
MIRROR_ENV = "SIMILARPATIENTS_WEIGHTS_MIRROR"
log = logging.getLogger(__name__)


_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubFile:
    """A file in a Hugging Face repository, at ``revision`` (a commit pins it; a branch moves)."""

    repo_id: str
    filename: str  #: its path in the repository
    repo_type: str = "model"  #: or "dataset"
    revision: str = "main"

    @property
    def page(self) -> str:
        """The repository's page (where gated terms are accepted)."""
        return f"https://huggingface.co/{'datasets/' if self.repo_type == 'dataset' else ''}{self.repo_id}"

    @property
    def url(self) -> str:
        return f"{self.page}/resolve/{self.revision}/{quote(self.filename)}"


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
        hub: the file on the Hugging Face hub, fetched with ``huggingface_hub`` (None: a plain URL).
    """

    url: str
    file_name: str
    licence: str
    needs_acknowledgement: bool
    size: int | None = None
    sha256: str | None = None
    hub: HubFile | None = None

    @property
    def pinned(self) -> bool:
        """The source names one immutable version (a Hugging Face commit, a Zenodo record file), not a branch."""
        if self.hub is not None:
            return bool(_COMMIT.fullmatch(self.hub.revision))
        return bool(re.search(r"zenodo\.org/records/\d+/files/", self.url))


def weights_dir() -> Path:
    return data_home() / "weights"


def cached_path(model: str, source: WeightSource) -> Path:
    return weights_dir() / model / source.file_name


def download_url(model: str, source: WeightSource) -> str:
    """Where ``model``'s weights are fetched from: the site's mirror when one is set, else the publisher."""
    mirror = os.environ.get(MIRROR_ENV, "").rstrip("/")
    return f"{mirror}/{model}/{source.file_name}" if mirror else source.url


def find_present(model: str, source: WeightSource) -> Path | None:
    """The weights file already on this machine (``$SIMILARPATIENTS_WEIGHTS_DIR``, our cache, or the Hugging
    Face cache at the revision asked for), if any."""
    candidates = []
    if os.environ.get(WEIGHTS_DIR_ENV):
        folder = Path(os.environ[WEIGHTS_DIR_ENV])
        candidates += [folder / model / source.file_name, folder / source.file_name]
    candidates.append(cached_path(model, source))
    found = next((p for p in candidates if p.is_file()), None)
    return found if found is not None or source.hub is None else _in_hub_cache(model, source)


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


def require_acceptance(states: list[WeightStatus], accept_licence: bool = False) -> None:
    """One question for every model about to be fetched (a fused query's, ``models download all``): the
    licences still to accept, all named in one error, or (``accept_licence``) accepted and recorded."""
    pending = [state for state in states if state.needs_acceptance]
    if accept_licence:
        for state in pending:
            acknowledge(state.model)
        return
    if pending:
        licences = "; ".join(f"{state.model}: '{state.source.licence}'" for state in pending)
        these = "weights are" if len(pending) == 1 else f"{len(pending)} models' weights are"
        raise SimilarPatientsError(
            f"The {these} published under licences to read and accept first: {licences}. Accept them once with "
            f"`similar-patients models accept {' '.join(state.model for state in pending)}` (or pass "
            f"--accept-licence); nothing is downloaded before that."
        )


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
    require_acceptance([state], accept_licence)
    expected = source.sha256 or recorded_sha256(model, source)
    digest = Digest("sha256", expected) if expected else None
    if source.hub is not None and not os.environ.get(MIRROR_ENV):
        path = _checked_size(_from_hub(model, source, progress), source)
        if digest is not None and not digest.matches(path):
            raise SimilarPatientsError(
                f"{model}'s weights from {source.hub.page} ({path}) do not match the sha256 {expected} "
                f"{'published' if source.sha256 else 'recorded at the first download'}: the upstream file changed "
                f"or the copy is damaged. Delete {path} and fetch it again; if it is still refused, the publisher "
                f"replaced the file: check it before trusting it."
            )
        if expected is None:
            _record_sha256(model, source, Digest("sha256", "").of_file(path))
        return path
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


def _hub_revision(model: str, source: WeightSource) -> str:
    """The revision to ask the hub for: the pinned commit, else the commit of the first download (recorded
    then), else the branch head."""
    if source.pinned:
        return source.hub.revision
    return _recorded().get(model, {}).get(_commit_key(source)) or source.hub.revision


def _commit_key(source: WeightSource) -> str:
    return f"commit of {source.url}"


def _hub_cache() -> str:
    """The Hugging Face cache as the environment names it now (``huggingface_hub`` reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    caches = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return os.path.join(os.environ.get("HF_HOME") or os.path.join(caches, "huggingface"), "hub")


def _in_hub_cache(model: str, source: WeightSource) -> Path | None:
    """The file in the Hugging Face cache, found without the network (none when huggingface_hub is missing)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hub = source.hub
    found = try_to_load_from_cache(
        hub.repo_id,
        hub.filename,
        cache_dir=_hub_cache(),
        revision=_hub_revision(model, source),
        repo_type=hub.repo_type,
    )
    return Path(found) if isinstance(found, str) else None


def _from_hub(model: str, source: WeightSource, progress: ProgressCallback | None) -> Path:
    """Fetch ``source.hub`` with ``huggingface_hub`` (token, cache, resume and progress are its own), at the
    pinned or recorded revision; the commit it answered from is recorded, so later fetches ask for that one."""
    hub_api = optional_import("huggingface_hub", "embed")
    errors = optional_import("huggingface_hub.errors", "embed")
    hub = source.hub
    revision = _hub_revision(model, source)
    bar = {}  # huggingface_hub >= 2 (Python >= 3.10) takes a bar class; older ones show only their own bar
    if progress is not None and "tqdm_class" in inspect.signature(hub_api.hf_hub_download).parameters:
        bar["tqdm_class"] = _reporting_bar(progress, f"downloading {source.file_name}")
    log.info("%s weights: %s %s at %s from the Hugging Face hub", model, hub.repo_id, hub.filename, revision)
    try:
        path = hub_api.hf_hub_download(
            hub.repo_id,
            hub.filename,
            repo_type=hub.repo_type,
            revision=revision,
            cache_dir=_hub_cache(),
            endpoint=os.environ.get("HF_ENDPOINT"),
            **bar,
        )
    except errors.HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        if status in (401, 403):
            raise SimilarPatientsError(
                f"{model}'s weights are in {hub.page}, which wants a Hugging Face account (HTTP {status}): log in "
                f"with `huggingface-cli login` or set HF_TOKEN, and accept the {hub.repo_type}'s terms on that "
                f"page; then run the same command again."
            ) from None
        raise SimilarPatientsError(f"{model}'s weights could not be fetched from {hub.page}: {error}") from None
    except errors.LocalEntryNotFoundError:
        raise SimilarPatientsError(
            f"{model}'s weights are not on this machine and the Hugging Face hub cannot be reached (this machine "
            f"looks offline). Fetch them elsewhere with `similar-patients models download {model}` and copy the "
            f"file, then `similar-patients models import {model} FILE` (or pass it with --weights)."
        ) from None
    path = Path(path)
    commit = path.parent.name if _COMMIT.fullmatch(path.parent.name) else None
    if commit and not source.pinned:
        _record(model, _commit_key(source), commit)
    return path


def _reporting_bar(progress: ProgressCallback, what: str):
    """A tqdm class for ``huggingface_hub`` whose bar also reports to ``progress`` (the Slicer dialog)."""
    from tqdm.auto import tqdm

    class Reporting(tqdm):
        def update(self, n=1):
            moved = super().update(n)
            report(progress, int(self.n), int(self.total or 0), what)
            return moved

    return Reporting


def import_file(model: str, source: WeightSource, file: Path | str) -> Path:
    """Copy a weights file fetched elsewhere into the cache (TotalSegmentator's ``import_weights``), after
    the checks a download gets: its size and the published or recorded sha256."""
    file = Path(file)
    if not file.is_file():
        raise SimilarPatientsError(f"{file} does not exist (expected {model}'s weights, {source.file_name}).")
    _checked_size(file, source)
    expected = source.sha256 or recorded_sha256(model, source)
    sha256 = Digest("sha256", "").of_file(file)
    if expected is not None and sha256 != expected:
        raise SimilarPatientsError(
            f"{file} is not {model}'s weights: its sha256 is {sha256}, the "
            f"{'published' if source.sha256 else 'recorded'} one {expected}. Nothing was imported."
        )
    target = cached_path(model, source)
    with writing(f"{model}'s weights"), replacing(target) as temporary:
        shutil.copyfile(file, temporary)
    if expected is None:
        _record_sha256(model, source, sha256)
    return target


def recorded_sha256(model: str, source: WeightSource) -> str | None:
    """The sha256 of ``model``'s first download from ``source``'s URL, where the publisher lists none."""
    return _recorded().get(model, {}).get(source.url)


def _record_sha256(model: str, source: WeightSource, sha256: str) -> None:
    log.info("%s weights: no published sha256; recorded %s of the first download", model, sha256)
    _record(model, source.url, sha256)


def _record(model: str, key: str, value: str) -> None:
    recorded = _recorded()
    recorded.setdefault(model, {})[key] = value
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
