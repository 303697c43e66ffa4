"""Numbers and times as the screens show them. Presentation only: no catalog, no appliance state."""

from __future__ import annotations

from typing import Any


def countdown(seconds: int) -> str:
    """14:59, or 1:02:03 past an hour."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def duration(seconds: float | None) -> str:
    """'45 s', '3 min 12 s', '2 h 05 min'; '-' when unknown."""
    if seconds is None:
        return "-"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {(seconds % 3600) // 60:02d} min"


def timestamp(iso: str | None) -> str:
    """'2026-11-23T06:34:23.198Z' -> '2026-11-23 06:34:23' (UTC, as stored)."""
    if not iso:
        return "-"
    return iso.replace("T", " ")[:19]


def progress_fraction(data: dict[str, Any]) -> tuple[float, float] | None:
    """(done, total) of a job's progress event: training steps or imported files."""
    if data.get("total_steps"):
        return float(data.get("step", 0)), float(data["total_steps"])
    if data.get("files_total"):
        return float(data.get("files_done", 0)), float(data["files_total"])
    return None


def progress_text(message: str, data: dict[str, Any]) -> str:
    """One line for a progress event: 'step 9/20 · loss 1.2345 · 812 tok/s · ETA 12 s'."""
    parts: list[str] = []
    if "step" in data and "total_steps" in data:
        parts.append(f"step {data['step']}/{data['total_steps']}")
        if data.get("loss") is not None:
            parts.append(f"loss {data['loss']:.4f}")
        if data.get("val_loss") is not None:
            parts.append(f"val loss {data['val_loss']:.4f}")
        if data.get("val_auc") is not None:
            parts.append(f"val AUC {data['val_auc']:.3f}")
        if data.get("tokens_per_s"):
            parts.append(f"{data['tokens_per_s']:.0f} tok/s")
    elif "files_done" in data and "files_total" in data:
        parts.append(f"files {data['files_done']}/{data['files_total']}")
        parts.append(f"{data.get('records', 0)} records")
    elif message:
        parts.append(message)
    if data.get("eta_s") is not None and parts:
        parts.append(f"ETA {duration(data['eta_s'])}")
    return " · ".join(parts)
