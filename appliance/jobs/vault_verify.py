"""Job kind `vault_verify`: decrypt-and-authenticate every stored file in the background.

On a site with terabytes of images this takes hours, so the TUI and the scheduler run it as a
job. It needs the vault's keys: a locked vault fails the job with "vault is locked" + hint.
"""

from __future__ import annotations

from typing import Any

from appliance.jobs.runner import JobContext


def run_vault_verify(ctx: JobContext) -> dict[str, Any]:
    from appliance.vault.lifecycle import keys_for
    from appliance.vault.store import verify_files

    keys = keys_for(ctx.db, ctx.home)
    sample = ctx.job.params.get("sample")
    ctx.progress("verifying", sample=sample)
    report = verify_files(ctx.db, keys, ctx.home, sample=sample)
    failed = [f.path for f in report.files if not f.ok]
    for path in failed[:50]:
        ctx.log(f"failed authentication: {path}")
    return {"ok": report.ok, "files_checked": report.files_checked, "files_failed": report.files_failed}
