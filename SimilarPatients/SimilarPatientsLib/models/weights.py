"""Model weights: where they come from, their licence, and one call that finds or fetches them.

Weights are looked for, in order: a file or folder the caller gives (offline sites; a ``gs://`` one is
copied once into the cache: how Dataflow workers get them), the folder ``$SIMILARPATIENTS_WEIGHTS_DIR``,
the cache under the data home (where ``models import`` puts a file), the Hugging Face cache; only then
downloaded. Weights on the Hugging Face hub come through ``huggingface_hub`` (the user's token from
``huggingface-cli login`` or ``$HF_TOKEN``, which gated repositories need; the shared Hugging Face cache;
``$HF_ENDPOINT`` for a hub mirror), at the commit the registry pins or, for an unpinned repository, the
commit of the first download (recorded then); others through ``pooch`` (a temporary file, checked against
the published or recorded hash, then moved into place); all are verified. A site that reaches no hub can
also serve the same files as
``<mirror>/<model>/<file name>`` (``$SIMILARPATIENTS_WEIGHTS_MIRROR``). Weights under a non-commercial or
unconfirmed licence are fetched only after the user has accepted it once (``similar-patients models accept``).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from ..errors import SimilarPatientsError
from ..progress import ProgressCallback, report
from ..util import files
from ..util.atomic import replacing
from ..util.home import data_home, writing
from ..util.optional import optional_import

WEIGHTS_DIR_ENV = "SIMILARPATIENTS_WEIGHTS_DIR"
MIRROR_ENV = "SIMILARPATIENTS_WEIGHTS_MIRROR"
_STALE_SECONDS = 60  #: a download's temporary file untouched this long is no live download's (pooch's timeout: 30 s)
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
        known_hash: the file's digest as published (``sha256:<hex>`` or ``md5:<hex>``, pooch's form), checked
            after every download. Without one, the sha256 of the first download is recorded and later
            downloads must match it (a changed upstream file is refused).
        hub: the file on the Hugging Face hub, fetched with ``huggingface_hub`` (None: a plain URL).
    """

    url: str
    file_name: str
    licence: str
    needs_acknowledgement: bool
    size: int | None = None
    known_hash: str | None = None
    hub: HubFile | None = None

    @property
    def pinned(self) -> bool:
        """The source names one immutable version: a Hugging Face commit, a Zenodo record's file, or (a URL
        that may be replaced) the file's published hash, which any other file fails."""
        if self.hub is not None:
            return bool(_COMMIT.fullmatch(self.hub.revision))
        return self.known_hash is not None or bool(re.search(r"zenodo\.org/records/\d+/files/", self.url))


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
    if source.hub is not None and not os.environ.get(MIRROR_ENV):
        return _verify_or_record(model, source, _from_hub(model, source, progress))
    return _from_url(model, source, progress)


def pin_revision(
    model: str,
    source: WeightSource,
    revision: str,
    accept_licence: bool = False,
    progress: ProgressCallback | None = None,
) -> Path:
    """Fetch an unpinned hub model's weights at ``revision`` (a commit, tag or branch) and record the commit it
    resolves to, with that file's sha256, in place of the first download's: later downloads ask for it."""
    if source.hub is None:
        raise SimilarPatientsError(
            f"{model}'s weights are not on the Hugging Face hub ({source.url}): there is no revision to choose."
        )
    if source.pinned:
        if revision != source.hub.revision:
            raise SimilarPatientsError(
                f"{model} is pinned at commit {source.hub.revision} of {source.hub.page} by this version of "
                f"SimilarPatients (with the file's published hash): another revision cannot be chosen for it."
            )
        return resolve(model, source, accept_licence=accept_licence, progress=progress)
    if os.environ.get(MIRROR_ENV):
        raise SimilarPatientsError(
            f"${MIRROR_ENV} is set: the site's mirror serves one file per model, not the hub's revisions. Unset "
            f"it to pin {model} at {revision}."
        )
    require_acceptance([WeightStatus(model, source, None, acknowledged(model))], accept_licence)
    path = _from_hub(model, source, progress, revision)
    commit = _commit_of(path)
    if commit is None:
        raise SimilarPatientsError(f"The hub did not say which commit '{revision}' of {source.hub.page} is.")
    _record(model, _commit_key(source), commit)
    _record(model, source.url, file_hash(path, "sha256"))
    log.warning("%s: pinned at commit %s of %s (asked for '%s').", model, commit, source.hub.page, revision)
    return path


def revision(model: str, source: WeightSource) -> str:
    """What a download of ``source`` asks for, as ``models list`` shows it: pinned (and how), or unpinned (the
    commit recorded at the first download, or the branch until then)."""
    if source.hub is not None:
        recorded = recorded_commit(model, source)
        if source.pinned:
            return f"pinned {source.hub.revision[:12]}"
        if recorded:
            return f"unpinned: recorded {recorded[:12]}"
        return f"unpinned: {source.hub.revision}, commit recorded at first download"
    if source.known_hash is not None:
        return f"pinned by its published {source.known_hash.split(':')[0]}"
    if source.pinned:
        return "pinned: a Zenodo record's file"
    return "unpinned URL: the first download's sha256 is recorded"


def expected_hash(model: str, source: WeightSource) -> str | None:
    """What a download must match (pooch's ``algorithm:hex``): the published hash, else the first download's
    sha256, recorded then; None before the first download of a file without a published hash."""
    recorded = recorded_sha256(model, source)
    return source.known_hash or (f"sha256:{recorded}" if recorded else None)


def file_hash(path: Path, algorithm: str = "sha256") -> str:
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _matches(path: Path, expected: str) -> bool:
    algorithm, _, digest = expected.rpartition(":")
    return file_hash(path, algorithm or "sha256") == digest.lower()


def _verify_or_record(model: str, source: WeightSource, path: Path) -> Path:
    """Check a hub download's size and hash against the published (or recorded) ones; with no hash, record
    its sha256. A file that fails leaves the Hugging Face cache: nothing wrong is kept to be found later."""
    expected = expected_hash(model, source)
    wrong_size = source.size is not None and path.stat().st_size != source.size
    if not wrong_size and expected is None:
        _record_sha256(model, source, file_hash(path))
        return path
    if not wrong_size and _matches(path, expected):
        return path
    blob = path.resolve()  # the Hugging Face cache links snapshots/<commit>/<file> to blobs/<hash>
    path.unlink()
    blob.unlink(missing_ok=True)
    known = "published" if source.known_hash else "recorded at the first download"
    raise SimilarPatientsError(
        f"{model}'s weights from {source.hub.page} do not match "
        f"{f'the published size, {source.size} bytes' if wrong_size else f'the {expected} {known}'}: the upstream "
        f"file changed or the transfer was damaged; nothing was kept. Run the same command again; if it is still "
        f"refused, the publisher replaced the file: check it before trusting it."
    )


def _from_url(model: str, source: WeightSource, progress: ProgressCallback | None) -> Path:
    """Fetch a plain URL (the publisher's, or the site's mirror) with ``pooch``: into a temporary file beside
    the cache file, checked against the published or recorded hash, then moved into place; on any failure
    nothing is kept. A file without a published hash gets its sha256 recorded."""
    pooch = optional_import("pooch", "embed")
    import requests

    url = download_url(model, source)
    expected = expected_hash(model, source)
    target = cached_path(model, source)
    offline = (
        f"Offline, copy {source.file_name} from {url} and import it with `similar-patients models import {model} "
        f"FILE` (or pass it with --weights, or put it in ${WEIGHTS_DIR_ENV})."
    )
    log.info("%s weights: downloading %s", model, url)
    _clear_stale_temporaries(target.parent)
    bar = _PoochProgress(progress, f"downloading {source.file_name}") if progress is not None else False
    downloader = pooch.HTTPDownloader(
        progressbar=bar, chunk_size=1 << 20, timeout=30, headers={"User-Agent": "SimilarPatients"}
    )
    try:
        with writing(f"{model}'s weights"), _quiet(pooch.get_logger()):
            pooch.retrieve(url, expected, fname=target.name, path=target.parent, downloader=downloader)
    except ValueError as error:  # pooch: the download's hash is not the expected one (it kept nothing)
        if "hash" not in str(error):
            raise SimilarPatientsError(f"{model}'s weights cannot be fetched from {url}: {error}") from None
        raise SimilarPatientsError(
            f"{model}'s weights downloaded from {url} do not match the {expected} "
            f"{'published' if source.known_hash else 'recorded at the first download'}: the upstream file changed "
            f"or the transfer was corrupted; nothing was kept. Run the same command again; if it is still refused, "
            f"the publisher replaced the file: check it before trusting it."
        ) from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout):
        raise SimilarPatientsError(
            f"{model}'s weights are not on this machine and {url} cannot be reached (this machine looks offline). "
            f"{offline}"
        ) from None
    except requests.exceptions.HTTPError as error:
        raise SimilarPatientsError(
            f"{model}'s weights could not be fetched: {url} answered HTTP {error.response.status_code}. {offline}"
        ) from None
    except requests.exceptions.RequestException as error:  # a transfer that broke off: the temporary file is gone
        raise SimilarPatientsError(
            f"The download of {model}'s weights from {url} broke off ({type(error).__name__}); nothing was kept. "
            f"Run the same command again. {offline}"
        ) from None
    if source.size is not None and target.stat().st_size != source.size:
        target.unlink()
        raise SimilarPatientsError(
            f"{url} sent {model}'s weights with another size than the published {source.size} bytes; nothing was "
            f"kept. {offline}"
        )
    if expected is None:
        _record_sha256(model, source, file_hash(target))
    return target


def _clear_stale_temporaries(folder: Path) -> None:
    """Remove pooch's temporary files that a killed download left (a cancelled Slicer worker): never resumed,
    they would only fill the disk. One written in the last minute may be another process's live download."""
    if folder.is_dir():
        for path in folder.glob("tmp*"):
            if path.is_file() and time.time() - path.stat().st_mtime > _STALE_SECONDS:
                path.unlink(missing_ok=True)


class _PoochProgress:
    """The progress bar ``pooch.HTTPDownloader`` drives (``total``, ``update``, ``reset``, ``close``),
    reporting to ``progress`` (the CLI's bars, the Slicer dialog)."""

    def __init__(self, progress: ProgressCallback, what: str):
        self.progress, self.what, self.total, self.n = progress, what, 0, 0

    def update(self, n: int) -> None:
        self.n = min(self.n + n, self.total) if self.total else self.n + n  # pooch counts whole chunks
        report(self.progress, self.n, self.total, self.what)

    def reset(self) -> None:
        self.n = 0

    def close(self) -> None:
        """Nothing to close: the caller's progress owns the display."""


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    """Keep pooch's own INFO lines (the URL, the hash) off the console: ours say the same once."""
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


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
    return recorded_commit(model, source) or source.hub.revision


def recorded_commit(model: str, source: WeightSource) -> str | None:
    """The commit an unpinned hub model's first download (or ``models download --revision``) came from."""
    return _recorded().get(model, {}).get(_commit_key(source))


def _commit_key(source: WeightSource) -> str:
    return f"commit of {source.url}"


def _commit_of(path: Path) -> str | None:
    """The commit a file in the Hugging Face cache came from (its ``snapshots/<commit>/`` folder)."""
    for folder in path.parents:
        if _COMMIT.fullmatch(folder.name) and folder.parent.name == "snapshots":
            return folder.name
    return None


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


def _from_hub(model: str, source: WeightSource, progress: ProgressCallback | None, revision: str | None = None) -> Path:
    """Fetch ``source.hub`` with ``huggingface_hub`` (token, cache, resume and progress are its own), at
    ``revision`` (:func:`pin_revision` records it), else the pinned or recorded one. An unpinned model's first
    download records the commit it came from and says so: later fetches ask for that commit, whatever the
    branch has become."""
    hub_api = optional_import("huggingface_hub", "embed")
    errors = optional_import("huggingface_hub.errors", "embed")
    hub = source.hub
    asked, revision = revision, revision or _hub_revision(model, source)
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
    commit = _commit_of(path)
    if commit and asked is None and not source.pinned and recorded_commit(model, source) is None:
        _record(model, _commit_key(source), commit)
        log.warning(
            "%s: %s names no pinned commit; this first download came from commit %s, now recorded: later "
            "downloads ask for it (`similar-patients models download %s --revision REV` pins another).",
            model,
            hub.page,
            commit,
            model,
        )
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
    the checks a download gets: its size and the published or recorded hash."""
    file = Path(file)
    if not file.is_file():
        raise SimilarPatientsError(f"{file} does not exist (expected {model}'s weights, {source.file_name}).")
    _checked_size(file, source)
    expected = expected_hash(model, source)
    if expected is not None and not _matches(file, expected):
        algorithm = expected.split(":")[0]
        raise SimilarPatientsError(
            f"{file} is not {model}'s weights: its {algorithm} is {file_hash(file, algorithm)}, the "
            f"{'published' if source.known_hash else 'recorded'} one {expected.split(':')[1]}. Nothing was imported."
        )
    target = cached_path(model, source)
    with writing(f"{model}'s weights"), replacing(target) as temporary:
        shutil.copyfile(file, temporary)
    if expected is None:
        _record_sha256(model, source, file_hash(target))
    return target


def recorded_sha256(model: str, source: WeightSource) -> str | None:
    """The sha256 of ``model``'s first download from ``source``'s URL, where the publisher lists none."""
    return _recorded().get(model, {}).get(source.url)


def _record_sha256(model: str, source: WeightSource, sha256: str) -> None:
    log.info("%s weights: no published hash; recorded the sha256 %s of the first download", model, sha256)
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
