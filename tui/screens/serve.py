"""Serve: start and stop the inference server (a `serve` job), its address, backend and live traffic; API keys.

The server is the job `airlock serve --detach` starts (`appliance.serve.status.start_server_job`):
it keeps serving when the UI closes. Live numbers come from the server's own /metrics, scraped
with the UI's monitoring key (kept encrypted in the vault; an admin creates it once with `m`).
A new API key is shown once in a dialog and never again; only its hash is stored.
"""

from __future__ import annotations

from typing import ClassVar

from textual import work
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Static

from tui.connection import catalog
from tui.dialogs import ConfirmByTyping, ConfirmDialog, FormDialog, FormField, SecretShownOnce
from tui.formatting import timestamp
from tui.messages import JobStarted, KeyCreated, ServeChanged, ServeLoaded, ServeView
from tui.screen_base import AirlockScreen
from tui.widgets import NavBar

DEFAULT_PORT = "8080"
WINDOW_S = 30.0


class ServeScreen(AirlockScreen):
    MODE = "serve"
    POLL_GROUP = "serve-poll"
    HELP = """
The inference server: an OpenAI-compatible endpoint (`/v1/chat/completions`, `/v1/completions`)
and `/v1/classify` for image models, on this site's network. **s** starts it for a task's
production model (it follows promotions: a promoted version is served within seconds) or for one
training run; it binds 127.0.0.1 unless you give another address. It runs as a job: it keeps
serving when this UI is closed. **x** stops it gracefully (requests in progress finish).

Clients need an **API key**: **n** creates one (it is shown once: copy it into the client's secret
store), **d** revokes the selected key (servers refuse it from the next request on).

Live numbers (requests per second, latency, errors) come from the server's `/metrics`, read with
the UI's own monitoring key; an admin creates it once with **m**.
"""
    BINDINGS: ClassVar[list] = [
        Binding("s", "start_server", "Start"),
        Binding("x", "stop_server", "Stop"),
        Binding("n", "new_key", "New key"),
        Binding("d", "revoke_key", "Revoke"),
        Binding("j", "open_job", "Job"),
        Binding("m", "monitor_key", "Monitoring key", show=False),
        Binding("r", "refresh", "Refresh", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.view: ServeView | None = None
        self.samples: list = []
        """Scrapes of the last WINDOW_S seconds: rates and latency are over that window."""
        self.traffic = None

    def compose(self) -> ComposeResult:
        yield NavBar(self.MODE)
        yield Static("Inference server. s start · x stop · n new API key", classes="screen-note")
        yield Static("checking…", id="server-state", classes="serve-line", markup=False)
        yield Static("", id="server-models", classes="serve-line", markup=False)
        yield Static("", id="server-traffic", classes="serve-line volatile", markup=False)
        yield Static("API keys (clients send 'Authorization: Bearer KEY')", classes="section-title")
        keys: DataTable = DataTable(id="keys", cursor_type="row", zebra_stripes=True)
        for label in ("name", "id", "state", "created", "may use"):
            keys.add_column(label, key=label)
        yield keys
        yield Footer()

    def poll(self):
        return self.load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="serve-poll")
    def load(self) -> None:
        from appliance.errors import AirlockError
        from appliance.jobs.runner import reconcile_jobs
        from appliance.registry.versions import list_tasks, production
        from appliance.serve.api_keys import list_keys
        from appliance.serve.status import MONITOR_KEY_NAME, monitor_secret, read_metrics, servers
        from appliance.train.runs import list_runs
        from appliance.vault.lifecycle import keys_for

        home = self.airlock.home
        sample, note = None, ""
        with catalog(home) as db:
            reconcile_jobs(db)
            found = servers(db, limit=10)  # running ones first
            server = found[0] if found else None
            others = max(0, sum(1 for s in found if s.running) - 1)
            keys = [k for k in list_keys(db) if k.name != MONITOR_KEY_NAME or k.state == "active"]
            choices = [(f"task {t.name} (production {production(db, t.name).id})", f"task:{t.name}")  # type: ignore[union-attr]
                       for t in list_tasks(db) if production(db, t.name) is not None]
            choices += [(f"run {r.id} ({r.base_model})", f"run:{r.id}") for r in list_runs(db, state="succeeded",
                                                                                        limit=20)]
            secret = None
            if server is not None and server.running and server.url:
                try:
                    secret = monitor_secret(db, keys_for(db, home), home)
                except AirlockError as exc:
                    note = f"live numbers: {exc.message}"
                if secret is None and not note:
                    note = "live numbers need the monitoring key: an admin presses m once"
        if secret is not None and server is not None and server.url:
            try:
                sample = read_metrics(server.url, secret)
            except AirlockError as exc:
                note = f"live numbers: {exc.message} ({exc.hint})"
        self.post_message(ServeLoaded(ServeView(server, sample, note, keys, choices, others)))

    def on_serve_loaded(self, message: ServeLoaded) -> None:
        from appliance.registry.overview import backend_label
        from appliance.serve.status import MONITOR_KEY_NAME, MONITOR_SCOPE, traffic

        view = self.view = message.view
        server = view.server
        state = self.query_one("#server-state", Static)
        models = self.query_one("#server-models", Static)
        live = self.query_one("#server-traffic", Static)
        if server is None:
            state.update("Server: STOPPED (never started here). s starts it.")
            models.update("")
        elif server.running:
            where = server.url or f"starting on {server.host}:{server.port} (loading models)"
            more = f" · {view.others_running} more running (`airlock jobs list`)" if view.others_running else ""
            state.update(f"Server: {server.job.state.upper()} · {where} · job {server.job.id}{more}")
            served = view.sample.models if view.sample else []
            if served:
                models.update("Serving: " + ", ".join(f"{m['model']} {m['version']} on {backend_label(m['backend'])}"
                                                      for m in served))
            else:
                models.update("Serving: " + ", ".join(server.models))
        else:
            ended = timestamp(server.job.finished_at)
            why = f": {server.job.error}" if server.job.error else ""
            state.update(f"Server: STOPPED · last ran {server.url or f'{server.host}:{server.port}'} "
                         f"(job {server.job.id}, {server.job.state} {ended}{why}). s starts it.")
            models.update("")
        if view.sample is not None:
            current = view.sample
            if self.samples and current.requests < self.samples[-1].requests:
                self.samples = []  # a restarted server counts from zero again
            self.samples = [s for s in self.samples if current.at - s.at <= WINDOW_S] + [current]
            window = self.traffic = traffic(self.samples[0] if len(self.samples) > 1 else None, current)
            total = traffic(None, current)

            def ms(value: float | None) -> str:
                return f"{value:.0f} ms" if value is not None else "-"

            live.update(f"Last {WINDOW_S:.0f} s: {window.requests_per_s:.2f} req/s · latency mean "
                        f"{ms(window.mean_latency_ms)}, p95 ≤ {ms(window.p95_latency_ms)} · {total.inflight:.0f} in "
                        f"flight\nSince start: {total.requests:.0f} requests, {total.errors:.0f} errors, mean "
                        f"{ms(total.mean_latency_ms)}")
        else:
            self.samples = []
            live.update(view.metrics_note)
        table = self.query_one("#keys", DataTable)
        cursor = table.cursor_row
        table.clear()
        for key in view.keys:
            scope = ("/metrics (this UI)" if key.name == MONITOR_KEY_NAME and key.tasks == (MONITOR_SCOPE,)
                     else ", ".join(key.tasks) or "all")
            table.add_row(key.name, key.key_id, key.state, timestamp(key.created_at), scope,
                          key=f"{key.name}\t{key.key_id}")
        if not view.keys:
            table.add_row("no API keys: n creates one", "", "", "", "")
        table.move_cursor(row=min(cursor, table.row_count - 1))
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        running = self.view is not None and self.view.server is not None and self.view.server.running
        if action == "stop_server":
            return running or None
        if action == "start_server":
            return not running or None
        return True

    # --- start and stop --------------------------------------------------------------------------------------------

    def action_start_server(self) -> None:
        if self.view is None:
            return
        if not self.view.choices:
            self.notify("nothing to serve: promote a model version (4) or train a run (3) first", severity="warning")
            return

        def chosen(values: dict[str, str] | None) -> None:
            if values is not None:
                self.start_server(values["what"], values["host"] or "127.0.0.1", values["port"] or DEFAULT_PORT)

        self.app.push_screen(FormDialog(
            "Start the inference server",
            "A task serves its production version and follows promotions; a run is served as it is. 127.0.0.1 "
            "answers this machine only; another address (e.g. 0.0.0.0) opens it to the network (use TLS there: "
            "`airlock serve --tls-cert`).",
            [FormField("what", "Serve", choices=tuple(self.view.choices)),
             FormField("host", "Address", "127.0.0.1"),
             FormField("port", "Port", DEFAULT_PORT, note="0 picks any free port")]), chosen)

    @work(thread=True, exclusive=True, exit_on_error=False, group="serve-control")
    def start_server(self, what: str, host: str, port_text: str) -> None:
        from appliance.access import require
        from appliance.serve.errors import ServeError
        from appliance.serve.status import start_server_job
        from appliance.vault.lifecycle import keys_for

        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ServeError(f"port {port_text!r} is not a TCP port", hint="use 1-65535 (8080 is usual), or 0")
        kind, _, name = what.partition(":")
        home = self.airlock.home
        with catalog(home) as db:
            keys_for(db, home)
            session = require(db, home, "serve.control")
            job = start_server_job(db, tasks=[name] if kind == "task" else [], runs=[name] if kind == "run" else [],
                                   host=host, port=int(port_text), actor=session.actor if session else None)
        self.post_message(JobStarted(job.id, f"server for {name}"))

    def on_job_started(self, message: JobStarted) -> None:
        self.notify(f"started the {message.what} (job {message.job_id}); it keeps serving if you close the UI")
        self.poll_now()

    def action_stop_server(self) -> None:
        server = self.view.server if self.view else None
        if server is None or not server.running:
            return
        job_id = server.job.id

        def answered(yes: bool | None) -> None:
            if yes:
                self.stop_server(job_id)

        self.app.push_screen(ConfirmDialog("Stop the server", f"Stop the server at {server.url or server.host}? "
                                           "Requests in progress finish; clients then get no answer."), answered)

    @work(thread=True, exclusive=True, exit_on_error=False, group="serve-control")
    def stop_server(self, job_id: str) -> None:
        from appliance.access import require
        from appliance.jobs.runner import cancel_job

        home = self.airlock.home
        with catalog(home) as db:
            require(db, home, "serve.control")
            cancel_job(db, job_id)
        self.post_message(ServeChanged("stopping the server: requests in progress finish first"))

    def on_serve_changed(self, message: ServeChanged) -> None:
        self.notify(message.text, markup=False)
        self.poll_now()

    def action_open_job(self) -> None:
        from tui.screens.job import JobScreen

        server = self.view.server if self.view else None
        if server is not None:
            self.app.push_screen(JobScreen(server.job.id))

    # --- API keys --------------------------------------------------------------------------------------------------

    def action_new_key(self) -> None:
        def chosen(values: dict[str, str] | None) -> None:
            if values is not None:
                tasks = [t.strip() for t in values["tasks"].split(",") if t.strip()]
                self.create_key(values["name"], tasks)

        self.app.push_screen(FormDialog(
            "New API key", "For one client (a PACS bridge, a script). It is shown once; only its hash is kept.",
            [FormField("name", "Name", placeholder="e.g. pacs-bridge"),
             FormField("tasks", "May use", placeholder="all models, or tasks separated by commas")]), chosen)

    @work(thread=True, exclusive=True, exit_on_error=False, group="serve-keys")
    def create_key(self, name: str, tasks: list[str]) -> None:
        from appliance.access import require
        from appliance.serve.api_keys import create_key

        home = self.airlock.home
        with catalog(home) as db:
            session = require(db, home, "keys.manage")
            found, secret = create_key(db, name, tasks, actor=session.actor if session else None)
        self.post_message(KeyCreated(found, secret))

    def on_key_created(self, message: KeyCreated) -> None:
        scope = ", ".join(message.key.tasks) or "every model"
        self.app.push_screen(SecretShownOnce(
            f"API key {message.key.name} (id {message.key.key_id})", message.secret,
            f"May use: {scope}. Clients send it as the header 'Authorization: Bearer KEY'."))
        message.secret = ""
        self.poll_now()

    def selected_key(self) -> str | None:
        table = self.query_one("#keys", DataTable)
        if not table.row_count or self.view is None or not self.view.keys:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value or ""
        name, _, key_id = key.partition("\t")
        found = next((k for k in self.view.keys if k.key_id == key_id), None)
        return name if found is not None and found.state == "active" else None

    def action_revoke_key(self) -> None:
        name = self.selected_key()
        if name is None:
            self.notify("select an active API key first", severity="warning")
            return

        def confirmed(ok: bool | None) -> None:
            if ok:
                self.revoke_key(name)

        self.app.push_screen(ConfirmByTyping(f"Revoke API key {name}? Its client is refused from the next request on.",
                                             name), confirmed)

    @work(thread=True, exclusive=True, exit_on_error=False, group="serve-keys")
    def revoke_key(self, name: str) -> None:
        from appliance.access import require
        from appliance.serve.api_keys import revoke_key

        home = self.airlock.home
        with catalog(home) as db:
            session = require(db, home, "keys.manage")
            revoke_key(db, name, actor=session.actor if session else None)
        self.post_message(ServeChanged(f"API key {name} revoked"))

    def action_monitor_key(self) -> None:
        self.create_monitor_key()

    @work(thread=True, exclusive=True, exit_on_error=False, group="serve-keys")
    def create_monitor_key(self) -> None:
        from appliance.access import require
        from appliance.serve.status import create_monitor_key
        from appliance.vault.lifecycle import keys_for

        home = self.airlock.home
        with catalog(home) as db:
            keys = keys_for(db, home)
            session = require(db, home, "keys.manage")
            found = create_monitor_key(db, keys, home, actor=session.actor if session else None)
        self.post_message(ServeChanged(f"monitoring key {found.key_id} created (stored encrypted; it reads "
                                       "/metrics only)"))

    def action_refresh(self) -> None:
        self.poll_now()

    def palette_commands(self):
        yield SystemCommand("Start server", "serve a task's production model or a run (a job)",
                            self.action_start_server)
        yield SystemCommand("Stop server", "stop the running server gracefully", self.action_stop_server)
        yield SystemCommand("New API key", "a key for one client, shown once", self.action_new_key)
        yield SystemCommand("Revoke API key", "the selected key stops working at once", self.action_revoke_key)
        yield SystemCommand("Create monitoring key", "lets this UI read the server's /metrics (admin, once)",
                            self.action_monitor_key)
        yield SystemCommand("Open server job", "the server's job: state and log", self.action_open_job)
