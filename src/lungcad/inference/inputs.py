"""What a file is, decided by its content, and which files of a folder are inputs.

`file_kind` is lungcad's one file-type sniffer (after MONAI's one place that picks a reader by
content): `lungcad predict` (`sniff`, folder walking), the DICOM reader (`is_dicom`) and the web
app's upload validation (`lungcad.web.uploads.sniff`) all decide through it, so a file is never one
type to one of them and another type to the next. DICOM wins over an image magic: a DICOM
preamble may itself start like a TIFF or PNG (dual-personality files).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from lungcad.data.images import IMAGE_SUFFIXES

__all__ = ["DICOM_SUFFIXES", "HEAD_BYTES", "file_kind", "is_dicom", "iter_inputs", "sniff"]

HEAD_BYTES = 132  # DICOM Part 10: a 128-byte preamble, then b"DICM"; every image magic is shorter
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima"})
# Leading bytes of the image formats decode_image (Pillow) reads, and the kind each one names.
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"BM", "bmp"), (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"), (b"GIF8", "gif"), (b"RIFF", "webp"),
)


def file_kind(head: bytes) -> str | None:
    """"dicom", "png", "jpeg", "bmp", "tiff", "gif", "webp" or None from a file's leading bytes.

    DICOM needs all HEAD_BYTES bytes: a file of exactly 132 bytes ending in the magic is DICOM
    (an empty one, which its reader then reports), a shorter one never is.
    """
    if len(head) >= HEAD_BYTES and head[128:HEAD_BYTES] == b"DICM":
        return "dicom"
    for magic, kind in _IMAGE_MAGIC:
        if head.startswith(magic):
            return kind
    return None


def is_dicom(head: bytes) -> bool:
    """True if these leading bytes carry the DICOM Part 10 magic (`DICM` after the 128-byte preamble)."""
    return file_kind(head) == "dicom"


def sniff(head: bytes) -> str | None:
    """"dicom", "image" or None from a file's leading bytes (content, not the extension)."""
    kind = file_kind(head)
    return kind if kind in (None, "dicom") else "image"


def _wanted_in_folder(path: Path) -> bool:
    """In folders: files whose content is DICOM or an image, and files *named* like one.

    Named-like-one files are kept whatever their content, so a truncated or zero-byte scan is
    reported rather than skipped; anything else (README, DICOMDIR, .DS_Store) is skipped quietly.
    """
    if path.name.startswith(".") or path.name.upper() == "DICOMDIR":
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES:
        return True  # a FIFO or device named like an image is reported by the reader, not opened here
    if path.exists() and not path.is_file():
        return False  # an unnamed FIFO, device or socket: opening it to sniff could block forever
    try:
        with open(path, "rb") as fh:
            return sniff(fh.read(HEAD_BYTES)) is not None
    except OSError:
        return True  # unreadable: report it


def iter_inputs(paths: Iterable[str | Path]) -> Iterator[tuple[Path, str]]:
    """(file, problem) for every input: files as given, folders walked recursively in sorted order.

    `problem` is "" or a one-line reason the input cannot even be opened (missing path).
    """
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = 0
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    fp = Path(root) / f
                    if _wanted_in_folder(fp):
                        found += 1
                        yield fp, ""
            if not found:
                yield p, "folder holds no image or DICOM files"
        elif p.exists():
            yield p, ""
        else:
            yield p, "file not found"


def _common_source(sources: Iterable[str]) -> str:
    """The `source` of a series row: the slices' one file (frames of it) or their common folder."""
    paths = [s.split("#")[0] for s in sources]
    if len(set(paths)) == 1:
        return paths[0]
    try:
        return os.path.commonpath(paths)
    except ValueError:
        return paths[0]
