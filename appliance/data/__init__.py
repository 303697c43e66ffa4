"""Data import: text and DICOM from a local path into de-identified, deduplicated, split datasets.

One module per stage, each a pure function over bytes or records where it can be:

    walk.py        list the input files (symlink loops, unreadable files) in a stable order
    formats.py     detect and parse text formats into records (JSONL/JSON, CSV, TXT)
    clean.py       Unicode NFC, control characters, HTML, whitespace; every change counted
    pii.py         optional regex scrub of phone numbers, e-mail, ID numbers, dates
    dedup.py       exact SHA-256 and MinHash/LSH near-duplicates
    splits.py      train/val/test from a seeded hash of the content (or the patient pseudonym)
    dicom_deid.py  PS3.15 Annex E Basic Profile driven by annex_e_actions.csv
    dicom_pixels.py, images.py   pixels to float16 arrays
    report.py      the per-file outcome buckets whose counts add up to the files read
    pipeline.py    the import run without storage (what `--dry-run` prints)

Heavy libraries (numpy, pydicom, PIL) are imported inside functions.
"""
