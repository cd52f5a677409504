"""A version's manifest file: what the version holds (models, fields, source, notes) and the size and digest
of every other file in it.

It is written last, so a version folder without one is not a version. It carries its own digest (over its
content) and is checked byte for byte when read: a changed character is found before anything it says is
believed. It is rewritten (atomically) only to record a file added to the version later, such as the
approximate index of another metric.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import SimilarPatientsError
from ..util.atomic import replacing
from ..util.digests import ALGORITHM, FileRecord

NAME = "manifest.json"
#: 2: every file recorded with its size and digest; versions written before (no ``format``) are adopted
FORMAT = 2
_MODEL_FIELDS = ("folder", "dim", "lesions", "patients", "recipe")


class DamagedFile(SimilarPatientsError):
    """A file of a version is not what was written: ``relative`` (its path in the version) and what is wrong."""

    def __init__(self, relative: str, problem: str):
        super().__init__(f"{relative} {problem}")
        self.relative = relative
        self.problem = problem


def render(content: dict) -> str:
    """The manifest's text: ``content`` with its digest, always written the same way."""
    body = {key: value for key, value in content.items() if key != "digest"}
    return json.dumps({**body, "digest": _digest(body)}, indent=2) + "\n"


def write(folder: Path, content: dict) -> None:
    """Write (or replace) the manifest of ``folder`` atomically."""
    with replacing(Path(folder) / NAME) as temporary:
        temporary.write_text(render(content), encoding="utf-8")


def read(folder: Path) -> dict:
    """The manifest of the version ``folder``, checked: :class:`DamagedFile` if it cannot be read, is not
    what was written, or lacks what a version needs. A manifest written before files had digests (no
    ``format``) is returned as it is, to be adopted."""
    path = Path(folder) / NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DamagedFile(NAME, "is missing") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DamagedFile(NAME, f"cannot be read ({error})") from None
    try:
        content = json.loads(text)
    except ValueError as error:
        raise DamagedFile(NAME, f"is not valid JSON ({error})") from None
    if not isinstance(content, dict):
        raise DamagedFile(NAME, "does not hold a manifest")
    if "format" in content:
        if text != render(content):  # render writes the digest of the same body: equal text, equal digest
            raise DamagedFile(NAME, "has changed since it was written (it no longer matches its own digest)")
        if content["format"] != FORMAT or content.get("digests") != ALGORITHM:
            raise DamagedFile(NAME, f"is of format {content['format']}, which this SimilarPatients cannot read")
    _check_shape(content)
    return content


def files(content: dict) -> dict:
    """The recorded files of a manifest: path in the version → :class:`FileRecord`."""
    return {relative: FileRecord.from_dict(record) for relative, record in content.get("files", {}).items()}


def _check_shape(content: dict) -> None:
    """Refuse a manifest that lacks what a reference is opened with (a hand edit, or a file cut short)."""
    models = content.get("models")
    whole = (
        isinstance(content.get("name"), str)
        and isinstance(models, dict)
        and bool(models)
        and all(isinstance(info, dict) and all(field in info for field in _MODEL_FIELDS) for info in models.values())
        and isinstance(content.get("label_fields"), list)
        and isinstance(content.get("files", {}), dict)
        and all(isinstance(r, dict) and {"bytes", "digest"} <= set(r) for r in content.get("files", {}).values())
    )
    if not whole:
        raise DamagedFile(NAME, "lacks what a reference's manifest holds (name, models, fields, files)")


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()
