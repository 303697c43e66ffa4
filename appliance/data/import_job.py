"""Job kind `data_import`: one import as a job, so its progress reaches the catalog (and the TUI).

`airlock data import` runs the job in its own process and waits; `--detach` leaves it running
in the background like any other job. The job's parameters are the import path, the dataset name
and the options, so `airlock jobs resume` can run an interrupted import again from the start
(an import is all or nothing: there is no half to continue from).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from appliance.data.clean import CleanOptions
from appliance.data.formats import ParseOptions
from appliance.data.pipeline import ImportOptions, Progress
from appliance.data.splits import SplitSpec
from appliance.jobs.runner import JobContext

PROGRESS_EVERY_S = 0.5


def options_to_params(options: ImportOptions) -> dict[str, Any]:
    params = asdict(options)
    params["labels"] = str(options.labels) if options.labels else None
    params["parse"]["csv_columns"] = [list(pair) for pair in options.parse.csv_columns]
    # Audit rows refuse field names that look like secrets ("private..."): the job's parameters are audited.
    params["kept_vendor_creators"] = list(params.pop("private_creators_allowed"))
    return params


def options_from_params(params: dict[str, Any]) -> ImportOptions:
    values = dict(params)
    parse = dict(values.pop("parse"))
    parse["csv_columns"] = tuple(tuple(pair) for pair in parse.get("csv_columns", ()))
    return ImportOptions(parse=ParseOptions(**parse), clean=CleanOptions(**values.pop("clean")),
                         splits=SplitSpec(**values.pop("splits")),
                         labels=Path(values.pop("labels")) if values.get("labels") else values.pop("labels", None),
                         private_creators_allowed=tuple(values.pop("kept_vendor_creators", ())), **values)


def run_data_import(ctx: JobContext) -> dict[str, Any]:
    from appliance.data.store import import_dataset
    from appliance.vault.lifecycle import keys_for

    params = ctx.job.params
    options = options_from_params(params["options"])
    keys = keys_for(ctx.db, ctx.home)
    last = [0.0]

    def progress(p: Progress) -> None:
        if p.files_done < p.files_total and time.monotonic() - last[0] < PROGRESS_EVERY_S:
            return
        last[0] = time.monotonic()
        ctx.progress("importing", files_done=p.files_done, files_total=p.files_total, bytes_done=p.bytes_done,
                     bytes_total=p.bytes_total, records=p.records_imported,
                     eta_s=round(p.eta_s, 1) if p.eta_s is not None else None)

    result = import_dataset(ctx.db, ctx.home, keys, Path(params["path"]), params["name"], options, job_id=ctx.job.id,
                            actor=ctx.job.actor, progress=progress, should_stop=ctx.should_stop)
    summary = result.report.summary()
    return {"dataset": result.dataset, "version": result.version, "created": result.created,
            "records_added": result.report.records_imported, "files_read": summary["files_read"],
            "buckets": summary["buckets"], "splits": summary["splits"]}
