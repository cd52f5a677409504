"""Refuse damaged image files before their voxels are used: a file with fewer bytes than its header
declares, a gzip stream that ends early or fails its checksum, a DICOM slice cut short, and what ITK only
warns about.

SimpleITK reads a truncated NIfTI (plain or gzipped) without an error, filling the missing half with
zeros, which would become 0 HU of tissue in the crop: a plausible, wrong query. NRRD and MetaImage readers
fail on their own; their messages come through as ours.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import re
import struct
import sys
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from ..errors import SimilarPatientsError
from ..util.optional import optional_import

log = logging.getLogger(__name__)
_CHUNK = 1 << 22
#: ITK warnings that mean the data read is not the data written.
_PIXEL_DATA_TAG = struct.pack("<HH", 0x7FE0, 0x0010)  #: (7FE0,0010), little endian
_DAMAGE = re.compile(r"truncat|premature|not read completely|only \d+|short read|corrupt|unexpected end", re.I)


def check_whole(path: Path) -> None:
    """Raise if ``path`` is a NIfTI file (``.nii``, ``.nii.gz``) holding fewer voxel bytes than its header
    declares, or a gzip stream that is cut short or corrupt."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz", ".gz")):
        return
    compressed = name.endswith(".gz")
    try:
        header = _head(path, 540, compressed)
        declared = _nifti_bytes(header) if name.endswith((".nii", ".nii.gz")) else None
        present = _gzip_length(path) if compressed else path.stat().st_size
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise SimilarPatientsError(
            f"Cannot read {path}: the file is damaged ({error}); it is cut short or corrupt. Copy or download it again."
        ) from error
    if declared is not None and present < declared:
        raise SimilarPatientsError(
            f"Cannot read {path}: it holds {present} bytes but its header declares {declared}, so the file is "
            f"cut short ({100 * present / declared:.0f}% there). Copy or download it again."
        )


def check_dicom_pixels_whole(path: Path | str) -> None:
    """Raise if the DICOM file ``path`` ends before the pixel data its header declares. The GDCM of some
    SimpleITK releases (2.3, which Slicer 5.8 ships) reads such a slice padded with zeros instead of
    failing. Only the header is parsed; encapsulated (compressed) pixel data, of undefined length, is left
    to the decoder, which fails on a cut stream."""
    pydicom = optional_import("pydicom", "embed")
    with open(path, "rb") as stream:
        try:
            dataset = pydicom.dcmread(stream, stop_before_pixels=True)
        except Exception as error:  # pydicom raises many types for a damaged file
            raise SimilarPatientsError(f"{path} is a damaged DICOM file ({type(error).__name__}).") from error
        start = stream.tell()  # pydicom leaves the file at the pixel data element's tag
        head = stream.read(12)
    if len(head) < 8 or head[:4] != _PIXEL_DATA_TAG:
        return  # no pixel data (not an image slice), or another layout: the reader decides
    implicit = dataset.file_meta.get("TransferSyntaxUID", "") == "1.2.840.10008.1.2" if dataset.file_meta else False
    length, header = (struct.unpack("<I", head[4:8])[0], 8) if implicit else (struct.unpack("<I", head[8:12])[0], 12)
    if length != 0xFFFFFFFF and start + header + length > os.path.getsize(path):
        raise SimilarPatientsError(
            f"{path} is cut short: its pixel data ends {start + header + length - os.path.getsize(path)} bytes "
            f"early. Fetch the whole series again."
        )


def _head(path: Path, size: int, compressed: bool) -> bytes:
    opener = gzip.open if compressed else open
    with opener(path, "rb") as stream:
        return stream.read(size)


def _gzip_length(path: Path) -> int:
    """Decompressed length of a whole gzip file; gzip raises on a cut stream or a bad checksum."""
    length = 0
    with gzip.open(path, "rb") as stream:
        for block in iter(lambda: stream.read(_CHUNK), b""):
            length += len(block)
    return length


def _nifti_bytes(header: bytes) -> int | None:
    """Header + voxel bytes a NIfTI-1 or NIfTI-2 single file declares (None if it is not one)."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    count = 1
    for extent in dims[1 : 1 + max(0, min(int(dims[0]), 7))]:
        count *= max(int(extent), 1)
    return max(offset, 348) + count * bitpix // 8


@contextlib.contextmanager
def itk_warnings(where: str) -> Iterator[list]:
    """Collect what ITK writes to this process's stderr during the block (its warnings), off the terminal.
    Lines that mean damaged data become our error (also when ITK failed as well); the rest are logged."""
    collected: list[str] = []
    fd = 2  # ITK writes to the C library's stderr, whatever Python's sys.stderr is now
    try:
        sys.stderr.flush()
        saved = os.dup(fd)
    except (AttributeError, OSError, ValueError):  # no stderr at all (some GUIs): ITK's output goes elsewhere
        yield collected
        return
    failure = None
    with tempfile.TemporaryFile("w+b") as capture:
        os.dup2(capture.fileno(), fd)
        try:
            yield collected
        except RuntimeError as error:
            failure = error
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace")
    collected += [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    for line in collected:
        log.info("ITK: %s", line)
    damage = [line for line in collected if _DAMAGE.search(line)]
    if damage:
        raise SimilarPatientsError(
            f"Cannot read {where}: the image data is damaged ({damage[0]}). Copy or download it again."
        ) from failure
    if failure is not None:
        raise failure
