"""pydicom's test corpus (`pydicom.data.get_testdata_files()`), linked under one import root.

The corpus is the files that ship inside pydicom (test_files, charset_files, the dicomdirtests
tree) plus those of the `pydicom-data` package (a dev dependency: the enhanced CT, JPEG-LS,
JPEG 2000 and 12-bit JPEG files). Every file is linked, not only *.dcm: a PACS export holds
DICOMDIRs, README files and files without a suffix too, and each must land in one bucket.
"""

from __future__ import annotations

from pathlib import Path

NOT_IN_PACS_EXPORT = "the file is not DICOM"


def corpus_files() -> list[tuple[str, Path]]:
    """(relative name under the root, source path) for every file of the corpus, sorted by name."""
    import pydicom
    from pydicom.data import get_testdata_files

    bundled = Path(pydicom.__file__).resolve().parent / "data"
    files = []
    for name in get_testdata_files():
        path = Path(name).resolve()
        if not path.is_file():  # the dicomdirtests folders are listed too; their files are listed on their own
            continue
        if path.is_relative_to(bundled):
            rel = "pydicom/" + path.relative_to(bundled).as_posix()
        else:
            rel = "pydicom-data/" + path.name
        files.append((rel, path))
    return sorted(files)


def link_corpus(root: Path) -> dict[str, Path]:
    """Hard-link (or, across filesystems, copy) every corpus file under `root`; returns relative name -> source
    path. Not symbolic links: an import never follows them (they are reported and rejected)."""
    import os
    import shutil

    files = dict(corpus_files())
    for rel, source in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:  # another filesystem
            shutil.copy2(source, target)
    return files


def transfer_syntax(path: Path, *, keyword: bool = False) -> str:
    """The file's transfer syntax name, or its keyword (JPEGLosslessSV1); '(not DICOM)', '(no file meta)' ..."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import UID

    try:
        meta = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[0x00020010]).file_meta
    except InvalidDicomError:
        return "(not DICOM)"
    except Exception:  # a truncated or corrupt file: pydicom raises anything
        return "(unreadable)"
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if not ts:
        return "(no file meta)"
    return (UID(str(ts)).keyword if keyword else UID(str(ts)).name) or str(ts)
