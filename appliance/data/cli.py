"""`airlock data import|list|show|report|export|delete`: datasets in the encrypted store.

Every command first cleans up after imports that died (see `store.recover_imports`).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import click

from appliance.cli_output import echo_json, echo_table

_json = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
REPORT_ROWS = 40


def _open():
    from appliance.catalog import open_catalog
    from appliance.data.store import recover_imports
    from appliance.paths import airlock_home

    db = open_catalog()
    for line in recover_imports(db, airlock_home()):
        click.echo(f"note: {line}", err=True)
    return db


@click.group()
def data() -> None:
    """Import local data into encrypted, de-identified, deduplicated, split datasets."""


@data.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Dataset name; an existing dataset gets a new version.")
@click.option("--format", "fmt", type=click.Choice(["auto", "jsonl", "json", "csv", "txt", "dicom", "images"]),
              default="auto", show_default=True, help="Input format; auto decides per file.")
@click.option("--labels", type=click.Path(path_type=Path, dir_okay=False),
              help="CSV key,label for DICOM/images (key: file name, SOP/Series/StudyInstanceUID, AccessionNumber "
                   "or PatientID).")
@click.option("--profile", type=click.Choice(["general", "medical"]), default="general", show_default=True,
              help="medical turns on the PII scrub of free text.")
@click.option("--pii/--no-pii", "scrub_pii", default=None, help="Force the PII scrub on or off.")
@click.option("--encoding", default="utf-8", show_default=True, help="Text encoding, e.g. gbk or latin-1.")
@click.option("--txt-split", type=click.Choice(["file", "blocks"]), default="file", show_default=True,
              help="TXT: one document per file, or per blank-line separated block.")
@click.option("--columns", help="CSV mapping FIELD=COLUMN,..., e.g. prompt=Frage,completion=Antwort.")
@click.option("--min-chars", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-chars", type=click.IntRange(min=1), default=1_000_000, show_default=True)
@click.option("--max-record-mb", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Longest line/row/document read.")
@click.option("--near-dup", default="0.85", show_default=True,
              help="Near-duplicate similarity threshold in (0, 1], or 'off'.")
@click.option("--split", "split_text", help="train/val/test, e.g. 80/10/10 (fixed when the dataset is created).")
@click.option("--image-size", type=click.IntRange(8, 4096), default=224, show_default=True,
              help="Images are resized to this square size.")
@click.option("--frames", default="middle", show_default=True,
              help="DICOM multi-frame images: middle (one record, the middle frame), each (one record per frame) "
                   "or stack:N (N slices spread through the volume as the channels of one record, 2.5D).")
@click.option("--max-image-mb", type=click.IntRange(min=1), default=512, show_default=True,
              help="Largest DICOM/image file read.")
@click.option("--accept-burned-in", is_flag=True,
              help="Import DICOM images that may show burned-in patient text instead of quarantining them (audited).")
@click.option("--dry-run", is_flag=True, help="Report what would happen; store nothing (works while locked).")
@click.option("--detach", is_flag=True, help="Run as a background job and return at once.")
@_json
def data_import(path: Path, name: str, fmt: str, labels: Path | None, profile: str, scrub_pii: bool | None,
                encoding: str, txt_split: str, columns: str | None, min_chars: int, max_chars: int,
                max_record_mb: int, near_dup: str, split_text: str | None, image_size: int, frames: str,
                max_image_mb: int, accept_burned_in: bool,
                dry_run: bool, detach: bool, as_json: bool) -> int:
    """Import PATH (a file or folder, e.g. /media/usb) into dataset NAME.

    Every file ends in one bucket: imported, duplicate, cleaned-empty, quarantined or rejected, with
    its reason. An import is all or nothing: if it fails or is interrupted, nothing of it is kept.
    """
    from appliance.data import datasets
    from appliance.data.store import dry_run as run_dry
    from appliance.paths import airlock_home

    db = _open()
    datasets.check_name(name)
    existing = datasets.find(db, name)
    options = _options(fmt, labels, profile, scrub_pii, encoding, txt_split, columns, min_chars, max_chars,
                       max_record_mb, near_dup, split_text, image_size, max_image_mb, accept_burned_in,
                       existing.split_spec if existing else None, frames)
    if dry_run:
        report = run_dry(db, path, name, options)
        if as_json:
            echo_json({"dry_run": True, "dataset": name, "report": report.to_dict()})
        else:
            click.echo(f"dry run: nothing was stored. Importing {path} into {name!r} would give:")
            _echo_report(report.to_dict())
        return 0
    from appliance.access import require
    from appliance.data.import_job import options_to_params
    from appliance.jobs.records import create_job, get_job
    from appliance.jobs.runner import run_job, start_job
    from appliance.vault.lifecycle import keys_for

    keys_for(db, airlock_home())  # fail now with "vault is locked", not inside the job
    require(db, airlock_home(), "data.import")
    params = {"path": str(path.resolve()), "name": name, "options": options_to_params(options)}
    if detach:
        job = start_job(db, "data_import", params)
        click.echo(f"started {job.id}; follow it with `airlock jobs show {job.id}`")
        return 0
    job = create_job(db, "data_import", params)
    with _ProgressPrinter(job.id, enabled=not as_json):
        run_job(db, job.id)
    job = get_job(db, job.id)
    if job.state != "succeeded":
        from appliance.errors import AirlockError

        raise AirlockError(job.error or f"the import ended {job.state}", hint=job.hint or "")
    result = job.result or {}
    if as_json:
        echo_json({"job": job.id, **result})
        return 0
    ds = datasets.get(db, name)
    from appliance.data.store import load_report

    _, stored = load_report(db, keys_for(db, airlock_home()), airlock_home(), ds, result.get("version"))
    verb = "created" if result.get("created") else "added to"
    click.echo(f"{verb} dataset {name!r}: version {result.get('version')}, {result.get('records_added')} new records "
               f"(job {job.id})")
    _echo_report(stored)
    return 0


def _options(fmt, labels, profile, scrub_pii, encoding, txt_split, columns, min_chars, max_chars, max_record_mb,
             near_dup, split_text, image_size, max_image_mb, accept_burned_in, existing_split, frames="middle"):
    from appliance.data.clean import CleanOptions
    from appliance.data.errors import DataError
    from appliance.data.formats import ParseOptions, parse_csv_columns
    from appliance.data.pipeline import ImportOptions
    from appliance.data.splits import SplitSpec

    try:
        threshold = None if near_dup.strip().lower() == "off" else float(near_dup)
        splits = SplitSpec.parse(split_text) if split_text else SplitSpec.parse(existing_split or "80/10/10")
        return ImportOptions(
            fmt=fmt, profile=profile, scrub_pii=scrub_pii, labels=labels.resolve() if labels else None,
            parse=ParseOptions(encoding=encoding, max_record_bytes=max_record_mb * 1024 * 1024, txt_split=txt_split,
                               csv_columns=parse_csv_columns(columns) if columns else ()),
            clean=CleanOptions(min_chars=min_chars, max_chars=max_chars), near_dup_threshold=threshold,
            splits=splits, accept_burned_in=accept_burned_in, image_size=image_size, frames=frames,
            max_image_file_mb=max_image_mb)
    except ValueError as exc:
        raise DataError(f"invalid import option: {exc}", hint="see `airlock data import --help`") from None


class _ProgressPrinter:
    """Prints the job's progress events to stderr while it runs in this process (a terminal only)."""

    def __init__(self, job_id: str, enabled: bool) -> None:
        import sys

        self.job_id = job_id
        self.enabled = enabled and sys.stderr.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _ProgressPrinter:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join(timeout=2)
            click.echo("", err=True)

    def _run(self) -> None:
        from appliance.catalog import open_catalog
        from appliance.jobs.records import events

        db = open_catalog()
        seen = 0
        while not self._stop.wait(0.5):
            for event in events(db, self.job_id, after_id=seen, kind="progress"):
                seen = event.id
                d = event.data
                eta = f", about {int(d['eta_s'])} s left" if d.get("eta_s") else ""
                click.echo(f"\rfiles {d.get('files_done')}/{d.get('files_total')}, {d.get('records')} records{eta}   ",
                           err=True, nl=False)


def _echo_report(report: dict[str, Any]) -> None:
    buckets = report["buckets"]
    click.echo(f"files read: {report['files_read']}  " + "  ".join(f"{b}: {n}" for b, n in buckets.items()))
    records = report["records"]
    click.echo(f"records: {records['imported']} imported, {records['duplicates']} duplicates, "
               f"{records['cleaned_empty']} empty after cleaning, {records['rejected']} rejected")
    if report.get("splits"):
        click.echo("splits: " + ", ".join(f"{k} {v}" for k, v in sorted(report["splits"].items())))
    if report.get("changes"):
        click.echo("changes: " + ", ".join(f"{k} {v}" for k, v in report["changes"].items()))
    problems = [f for f in report.get("files", []) if f["bucket"] != "imported" or f["rejected"]]
    if problems:
        rows = []
        for f in problems[:REPORT_ROWS]:
            reason = f["reason"] or (f"{f['rejected']} records rejected; first: {f['issues'][0]['where']}: "
                                     f"{f['issues'][0]['reason']}" if f["issues"] else "")
            rows.append((f["rel"], f["bucket"], reason))
        echo_table(rows, ["file", "outcome", "why"], max_width=200)
        if len(problems) > REPORT_ROWS:
            click.echo(f"... and {len(problems) - REPORT_ROWS} more files (all of them with --json)")


@data.command("list")
@_json
def data_list(as_json: bool) -> None:
    """Datasets, with record counts per split."""
    from appliance.data import datasets

    db = _open()
    found = datasets.all_datasets(db)
    rows = []
    for ds in found:
        counts = datasets.split_counts(db, ds.id)
        versions = datasets.versions(db, ds.id)
        rows.append({**ds.to_dict(), "versions": len(versions), "records": sum(counts.values()), "split_counts": counts,
                     "updated_at": versions[-1].created_at if versions else ds.created_at})
    if as_json:
        echo_json({"datasets": rows})
        return
    if not rows:
        click.echo("no datasets yet: import one with `airlock data import PATH --name NAME`")
        return
    echo_table([(r["name"], r["kind"], r["records"], "/".join(str(r["split_counts"][s]) for s in ("train", "val",
                                                                                                  "test")),
                 r["versions"], r["updated_at"]) for r in rows],
               ["name", "kind", "records", "train/val/test", "versions", "updated"])


@data.command("show")
@click.argument("name")
@_json
def data_show(name: str, as_json: bool) -> None:
    """One dataset: splits, labels, versions and what each import did (counts; no contents)."""
    from appliance.data import datasets

    db = _open()
    ds = datasets.get(db, name)
    counts = datasets.split_counts(db, ds.id)
    versions = datasets.versions(db, ds.id)
    labels = datasets.label_counts(db, ds.id) if ds.kind != "text" else {}
    if as_json:
        echo_json({"dataset": ds.to_dict(), "split_counts": counts, "labels": labels,
                   "versions": [v.to_dict() for v in versions]})
        return
    echo_table([("name", ds.name), ("kind", ds.kind), ("profile", ds.profile), ("splits", ds.split_spec),
                ("records", f"{sum(counts.values())} (train {counts['train']}, val {counts['val']}, "
                            f"test {counts['test']})"),
                ("created", f"{ds.created_at} by {ds.created_by}")], ["field", "value"])
    if labels:
        click.echo("")
        echo_table([(label or "(none)", by.get("train", 0), by.get("val", 0), by.get("test", 0))
                    for label, by in labels.items()], ["label", "train", "val", "test"])
    click.echo("")
    echo_table([(v.version, v.created_at, v.created_by, v.records_added, v.summary["files_read"],
                 ", ".join(f"{b} {n}" for b, n in v.summary["buckets"].items() if n and b != "imported") or "-")
                for v in versions], ["version", "imported at", "by", "new records", "files", "not imported"])
    click.echo(f"\nper-file outcomes: `airlock data report {ds.name}`")


@data.command("report")
@click.argument("name")
@click.option("--version", "version", type=click.IntRange(min=1), help="Which import (default: the latest).")
@_json
def data_report(name: str, version: int | None, as_json: bool) -> None:
    """Per-file outcomes of an import. File names may identify patients, so this needs an unlocked vault."""
    from appliance.access import require
    from appliance.data import datasets
    from appliance.data.store import load_report
    from appliance.paths import airlock_home
    from appliance.vault.lifecycle import keys_for

    db = _open()
    ds = datasets.get(db, name)
    require(db, airlock_home(), "data.report")
    entry, report = load_report(db, keys_for(db, airlock_home()), airlock_home(), ds, version)
    if as_json:
        echo_json({"dataset": ds.name, "version": entry.version, "report": report})
        return
    click.echo(f"dataset {ds.name!r}, version {entry.version}, imported {entry.created_at} by {entry.created_by}")
    _echo_report(report)
    click.echo("imported files: " + str(sum(1 for f in report["files"] if f["bucket"] == "imported")))


@data.command("export")
@click.argument("name")
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="New or empty folder to write into.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), help="Only this split.")
def data_export(name: str, out: Path, split: str | None) -> None:
    """Write the stored, de-identified records out (JSONL, or DICOM/PNG per label) for a data steward. Audited."""
    from appliance.access import require
    from appliance.data.store import export_dataset
    from appliance.paths import airlock_home
    from appliance.vault.lifecycle import keys_for

    db = _open()
    require(db, airlock_home(), "data.export")
    counts = export_dataset(db, keys_for(db, airlock_home()), airlock_home(), name, out, split=split)
    click.echo(f"exported {sum(counts.values())} records of {name!r} to {out} "
               f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or 'none'})")
    click.echo("these files are plaintext: review them on this machine and delete them when done")


@data.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask to type the name.")
def data_delete(name: str, yes: bool) -> None:
    """Crypto-shred a dataset: its data key is destroyed, then its files. Cannot be undone."""
    from appliance.access import require
    from appliance.data import datasets
    from appliance.data.errors import DataError
    from appliance.data.store import delete_dataset
    from appliance.paths import airlock_home

    db = _open()
    ds = datasets.get(db, name)
    require(db, airlock_home(), "data.delete")
    if not yes:
        typed = click.prompt(f"This destroys dataset {name!r} for good. Type its name to confirm", default="",
                             show_default=False)
        if typed != name:
            raise DataError("the name did not match; nothing was deleted", hint=f"type {name} exactly, or pass --yes")
    count = delete_dataset(db, airlock_home(), ds.name)
    from appliance.vault.store import shred_pending_note

    note = shred_pending_note(db)
    if note:
        click.echo(f"dataset {name!r}: {count} records removed from the catalog and its files removed", err=True)
        click.echo(note, err=True)
        raise SystemExit(3)
    click.echo(f"deleted dataset {name!r}: {count} records; its key is destroyed and its files removed")
