"""Hot swap: follow promotions without dropping a request.

    table = ModelTable([model])                     # what requests read, by name
    watcher = Watcher(home, table, sources, load, report, interval_s=2.0)
    watcher.start()                                 # a daemon thread; watcher.stop() joins it

Every `interval_s` the watcher asks each source which version should be served (for a task: its
production version in the registry). When that changed, it loads the new version in the
background while the old one keeps serving, then replaces the table entry in one assignment.
A request takes its model from the table once, when it starts, so in-flight requests finish on
the version they started with; the old weights are freed when the last of them ends. A load that
fails (vault locked, a corrupt artifact, a base model missing) leaves the old version serving and
is reported (log line, /metrics, audit row); the same version is retried after `retry_after_s`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from appliance.errors import AirlockError
from appliance.serve.models import ServedModel, Target

RETRY_FAILED_AFTER_S = 60.0


class ModelTable:
    """The served models by name. Reads take no lock: replacing a dict entry is atomic in CPython."""

    def __init__(self, models: Iterable[ServedModel] = ()) -> None:
        self._models: dict[str, ServedModel] = {m.name: m for m in models}
        self._write = threading.Lock()

    def get(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    def all(self) -> list[ServedModel]:
        return list(self._models.values())

    def put(self, model: ServedModel) -> ServedModel | None:
        """Serve `model` under its name from the next request on; returns the model it replaced."""
        with self._write:
            old = self._models.get(model.name)
            self._models[model.name] = model
            return old


Report = Callable[[str, str, dict[str, Any]], None]
"""report(event, model name, details): event is 'swapped', 'load_failed' or 'no_production'."""


class Watcher:
    def __init__(self, home: Path, table: ModelTable, sources: Iterable[Any],
                 load: Callable[[Any, str, Target], ServedModel], report: Report, *, interval_s: float = 2.0,
                 retry_after_s: float = RETRY_FAILED_AFTER_S) -> None:
        self.home = home
        self.table = table
        self.sources = list(sources)
        self.load = load
        self.report = report
        self.interval_s = interval_s
        self.retry_after_s = retry_after_s
        self._failed: dict[str, tuple[str, float]] = {}
        self._quiet: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="airlock-model-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        from appliance.catalog import open_catalog

        db = open_catalog(self.home)  # a connection of this thread's own
        try:
            while not self._stop.wait(self.interval_s):
                for source in self.sources:
                    if self._stop.is_set():
                        break
                    self.check(db, source)
        finally:
            db.close()

    def check(self, db: Any, source: Any) -> bool:
        """Load and switch to the version `source` names now, if it changed. True when it switched."""
        name = source.name
        try:
            target = source.resolve(db)
        except AirlockError as exc:
            self._report_once(name, "resolve_failed", {"error": exc.message})
            return False
        if target is None:
            self._report_once(name, "no_production", {})
            return False
        self._quiet.discard(name)
        current = self.table.get(name)
        if current is not None and current.target.version_id == target.version_id:
            return False
        failed = self._failed.get(name)
        if failed and failed[0] == target.version_id and time.monotonic() - failed[1] < self.retry_after_s:
            return False
        try:
            model = self.load(db, name, target)
        except AirlockError as exc:
            self._failed[name] = (target.version_id, time.monotonic())
            self.report("load_failed", name, {"version": target.version, "run": target.run_id, "error": exc.message,
                                              "hint": exc.hint,
                                              "serving": current.version if current else None})
            return False
        except Exception as exc:  # an unexpected failure must not end the watcher; the old version keeps serving
            self._failed[name] = (target.version_id, time.monotonic())
            self.report("load_failed", name, {"version": target.version, "run": target.run_id,
                                              "error": f"internal error ({type(exc).__name__})",
                                              "serving": current.version if current else None})
            return False
        self._failed.pop(name, None)
        old = self.table.put(model)
        self.report("swapped", name, {"from": old.version if old else None, "to": model.version,
                                      "run": target.run_id, "load_s": round(model.load_seconds, 2)})
        return True

    def _report_once(self, name: str, event: str, details: dict[str, Any]) -> None:
        if name not in self._quiet:
            self._quiet.add(name)
            self.report(event, name, details)
