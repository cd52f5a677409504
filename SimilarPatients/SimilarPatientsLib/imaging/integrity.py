"""Refuse damaged image files before their voxels are used: a file with fewer bytes than its header
declares, a gzip stream that ends early or fails its checksum, a DICOM slice cut short, a NIfTI holding NaN
or infinite voxels (ITK reads them as 0, or rescales the whole image), and what ITK only warns about.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SimilarPatientsError
from ..util.optional import optional_import

log = logging.getLogger(__name__)
_CHUNK = 1 << 22
#: NIfTI datatype codes of floating-point voxels (FLOAT32, FLOAT64): the ones that can hold NaN.
_FLOAT_TYPES = {16: "f4", 64: "f8"}
#: ITK warnings that mean the data read is not the data written.
_PIXEL_DATA_TAG = struct.pack("<HH", 0x7FE0, 0x0010)  #: (7FE0,0010), little endian
_DAMAGE = re.compile(r"truncat|premature|not read completely|only \d+|short read|corrupt|unexpected end", re.I)


def check_whole(path: Path) -> None:
    """Raise if ``path`` is a NIfTI file (``.nii``, ``.nii.gz``) holding fewer voxel bytes than its header
    declares or NaN or infinite voxels, or a gzip stream that is cut short or corrupt."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz", ".gz")):
        return
    compressed = name.endswith(".gz")
    try:
        header = _head(path, 540, compressed)
        layout = _nifti_layout(header) if name.endswith((".nii", ".nii.gz")) else None
        floating = layout is not None and layout.values is not None
        if compressed or floating:  # the whole stream is read: its length, and the values ITK would mangle
            with (gzip.open if compressed else open)(path, "rb") as stream:
                present, broken = _scan(stream, layout if floating else None)
        else:
            present, broken = path.stat().st_size, 0
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise SimilarPatientsError(
            f"Cannot read {path}: the file is damaged ({error}); it is cut short or corrupt. Copy or download it again."
        ) from error
    if layout is not None and present < layout.size:
        raise SimilarPatientsError(
            f"Cannot read {path}: it holds {present} bytes but its header declares {layout.size}, so the file is "
            f"cut short ({100 * present / layout.size:.0f}% there). Copy or download it again."
        )
    if broken:
        raise SimilarPatientsError(
            f"Cannot read {path}: it holds {broken} NaN or infinite voxel(s), which ITK's NIfTI reader turns into "
            f"other numbers (0, or all values rescaled) without a word. Replace them (with air, -1024 HU, outside "
            f"the body) and save the image again."
        )


@dataclass(frozen=True)
class _NiftiLayout:
    size: int  #: header + voxel bytes the header declares
    offset: int  #: where the voxels begin
    values: np.dtype | None  #: the voxels' type when it can hold NaN (float), else None


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


def _scan(stream, layout: _NiftiLayout | None) -> tuple[int, int]:
    """The stream's length, and (with a ``layout``) how many of its voxels are NaN or infinite. gzip raises
    on a cut stream or a bad checksum."""
    length, broken, pending = 0, 0, b""
    for block in iter(lambda: stream.read(_CHUNK), b""):
        start, length = length, length + len(block)
        if layout is None or length <= layout.offset:
            continue
        data = pending + block[max(layout.offset - start, 0) :]
        whole = len(data) - len(data) % layout.values.itemsize
        values = np.frombuffer(data[:whole], layout.values)
        if not np.isfinite(values.sum(dtype=np.float64)):  # a float64 sum of finite voxels is finite: one pass
            broken += int(values.size - np.count_nonzero(np.isfinite(values)))
        pending = data[whole:]
    return length, broken


def _nifti_layout(header: bytes) -> _NiftiLayout | None:
    """What a NIfTI-1 or NIfTI-2 single file's header declares (None if it is not one)."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    count = 1
    for extent in dims[1 : 1 + max(0, min(int(dims[0]), 7))]:
        count *= max(int(extent), 1)
    offset = max(offset, 348)
    floating = _FLOAT_TYPES.get(int(datatype))
    return _NiftiLayout(
        offset + count * bitpix // 8, offset, np.dtype(floating).newbyteorder(order) if floating else None
    )


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
