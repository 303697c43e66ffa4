"""Train: choose a base model and a dataset, fill in the recipe (defaults shown), start the run.

The run starts as `airlock train lm|classifier` starts it (`appliance.train.jobs.start_training`):
a detached job pinned to the dataset's latest version. The form comes from the recipe dataclass
(`tui.recipe_form`); its bounds and messages are the appliance's.
"""

from __future__ import annotations

from typing import Any, ClassVar

from textual import work
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Footer, Input, Label, Select, Static

from tui.connection import catalog
from tui.messages import JobStarted, TrainChoices, TrainChoicesLoaded
from tui.recipe_form import RecipeField, build_recipe, parse_value, recipe_fields
from tui.screen_base import AirlockScreen
from tui.widgets import NavBar

KIND_OF_DATA = {"text": "lm", "images": "classifier", "dicom": "classifier"}
KIND_TITLES = {"lm": "LoRA, language model", "classifier": "image classifier"}


class TrainScreen(AirlockScreen):
    MODE = "train"
    HELP = """
Fine-tune a base model on a dataset from the vault. Text datasets train a language model with
LoRA; image and DICOM datasets train an image classifier. The run pins the dataset's latest
version, so later imports never change what it was trained on.

Every recipe field is optional: an empty field keeps its default (shown greyed). Values are
checked as you type, with the same bounds as `airlock train lm --recipe recipe.toml`.
**ctrl+s** starts the run as a job: it keeps running if you close the UI, and resumes from its
last checkpoint after a power loss (`r` on the job screen).
"""
    BINDINGS: ClassVar[list] = [
        Binding("ctrl+s", "start", "Start training", priority=True),
        Binding("ctrl+d", "defaults", "Defaults"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.kind = "lm"
        self.fields: list[RecipeField] = []
        self.dataset_kinds: dict[str, str] = {}
        self.all_bases: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        yield NavBar(self.MODE)
        with Horizontal(classes="field"):
            yield Label("Base model", classes="field-label")
            yield Select([], id="base", compact=True, prompt="(loading)")
        with Horizontal(classes="field"):
            yield Label("Dataset", classes="field-label")
            yield Select([], id="dataset", compact=True, prompt="(loading)")
        yield Static("", id="recipe-title", classes="screen-note")
        yield VerticalScroll(id="recipe")
        yield Static("", id="recipe-check")
        yield Footer()

    def on_mount(self) -> None:
        self.show_form("lm")

    def on_screen_resume(self) -> None:
        self.load_choices()

    # --- choices -------------------------------------------------------------------------------------------------

    @work(thread=True, exclusive=True, exit_on_error=False, group="train-choices")
    def load_choices(self) -> None:
        from appliance.base_models import CAUSAL_LM_ARCHITECTURES, list_base_models
        from appliance.data import datasets

        bases = [f"{m.name}\t{'lm' if m.architecture in CAUSAL_LM_ARCHITECTURES else 'classifier'}"
                 for m in list_base_models() if m.has_weights or m.architecture not in CAUSAL_LM_ARCHITECTURES]
        with catalog(self.airlock.home) as db:
            found = []
            for ds in datasets.all_datasets(db):
                records = sum(datasets.split_counts(db, ds.id).values())
                found.append((f"{ds.name}\t{ds.kind}", f"{ds.name} ({ds.kind}, {records} records)"))
        self.post_message(TrainChoicesLoaded(TrainChoices(bases, found)))

    def on_train_choices_loaded(self, message: TrainChoicesLoaded) -> None:
        self.all_bases = dict(b.split("\t") for b in message.choices.base_models)
        self.dataset_kinds = {key.split("\t")[0]: key.split("\t")[1] for key, _ in message.choices.datasets}
        dataset = self.query_one("#dataset", Select)
        current = dataset.value
        dataset.set_options([(label, key.split("\t")[0]) for key, label in message.choices.datasets])
        dataset.prompt = "(no datasets: import one with 2, then n)" if not message.choices.datasets else "(choose)"
        if current in self.dataset_kinds:
            dataset.value = current
        elif self.dataset_kinds:
            dataset.value = next(iter(self.dataset_kinds))
        self.offer_bases()

    def offer_bases(self) -> None:
        base = self.query_one("#base", Select)
        current = base.value
        names = [name for name, kind in self.all_bases.items() if kind == self.kind]
        base.set_options([(name, name) for name in names])
        base.prompt = "(no base model for this kind of data)" if not names else "(choose)"
        if current in names:
            base.value = current
        elif names:
            base.value = names[0]

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "dataset" and isinstance(event.value, str):
            kind = KIND_OF_DATA.get(self.dataset_kinds.get(event.value, "text"), "lm")
            if kind != self.kind:
                self.show_form(kind)
                self.offer_bases()
        elif (event.select.id or "").startswith("recipe-"):
            self.check_recipe()

    # --- the recipe form -----------------------------------------------------------------------------------------

    def show_form(self, kind: str) -> None:
        from appliance.train.jobs import recipe_class

        self.kind = kind
        self.fields = recipe_fields(recipe_class(kind))
        self.query_one("#recipe-title", Static).update(
            f"Recipe ({KIND_TITLES[kind]}) · empty = default · ctrl+s starts")
        form = self.query_one("#recipe", VerticalScroll)
        form.remove_children()
        form.mount_all([self.field_row(spec) for spec in self.fields])
        self.query_one("#recipe-check", Static).update("")

    def field_row(self, spec: RecipeField) -> Horizontal:
        widget: Input | Select
        if spec.kind == "bool":
            widget = Select([("yes", "true"), ("no", "false")], value="true" if spec.default else "false",
                            allow_blank=False, compact=True, id=f"recipe-{spec.name}")
        elif spec.choices:
            widget = Select([(c, c) for c in spec.choices], value=spec.default, allow_blank=False, compact=True,
                            id=f"recipe-{spec.name}")
        else:
            widget = Input(placeholder=spec.default_text or "(none)", compact=True, id=f"recipe-{spec.name}")
        return Horizontal(Label(spec.name, classes="recipe-name"), widget,
                          Static(spec.doc, classes="recipe-doc"), classes="recipe-row")

    def set_field(self, name: str, text: str) -> None:
        """Type a value into a field (as an operator would)."""
        widget = self.query_one(f"#recipe-{name}")
        if isinstance(widget, Input):
            widget.value = text
        elif isinstance(widget, Select):
            widget.value = text

    def recipe_values(self) -> dict[str, Any]:
        values = {}
        for spec in self.fields:
            widget = self.query_one(f"#recipe-{spec.name}")
            text = str(widget.value) if isinstance(widget, Select) else widget.value  # type: ignore[attr-defined]
            values[spec.name] = parse_value(spec, text)
        return values

    def recipe(self) -> Any:
        from appliance.train.jobs import recipe_class

        return build_recipe(recipe_class(self.kind), self.recipe_values())

    def on_input_changed(self, event: Input.Changed) -> None:
        if (event.input.id or "").startswith("recipe-"):
            self.check_recipe()

    def check_recipe(self) -> bool:
        from appliance.errors import AirlockError

        check = self.query_one("#recipe-check", Static)
        try:
            self.recipe()
        except AirlockError as exc:
            check.update(f"! {exc.message}" + (f"\nhint: {exc.hint}" if exc.hint else ""))
            check.set_class(True, "-bad")
            return False
        check.update("recipe valid")
        check.set_class(False, "-bad")
        return True

    def action_defaults(self) -> None:
        self.show_form(self.kind)

    # --- start ---------------------------------------------------------------------------------------------------

    def action_start(self) -> None:
        base = self.query_one("#base", Select).value
        dataset = self.query_one("#dataset", Select).value
        if not isinstance(base, str) or not isinstance(dataset, str):
            self.notify("choose a base model and a dataset first", severity="warning")
            return
        from appliance.errors import AirlockError

        try:
            recipe = self.recipe()
        except AirlockError as exc:  # the recipe's own error (message + hint), as a dialog
            self.airlock.show_error(exc)
            return
        self.query_one("#recipe-check", Static).update("starting…")
        self.start(self.kind, base, dataset, recipe)

    @work(thread=True, exclusive=True, exit_on_error=False, group="train-start")
    def start(self, kind: str, base: str, dataset: str, recipe: Any) -> None:
        from appliance.access import require
        from appliance.train.jobs import start_training
        from appliance.vault.lifecycle import keys_for

        home = self.airlock.home
        with catalog(home) as db:
            keys_for(db, home)  # fail now with "vault is locked", not inside the job
            require(db, home, "train.start")
            run, job = start_training(db, kind, base, dataset, recipe, device="auto")
        self.post_message(JobStarted(job.id, f"training run {run.id}"))

    def on_job_started(self, message: JobStarted) -> None:
        from tui.screens.job import JobScreen

        self.query_one("#recipe-check", Static).update("")
        self.notify(f"started {message.what}; it keeps running if you close the UI")
        self.app.push_screen(JobScreen(message.job_id))

    def palette_commands(self):
        yield SystemCommand("Start training", "start the run with this recipe (a job)", self.action_start)
        yield SystemCommand("Reset recipe", "every recipe field back to its default", self.action_defaults)
