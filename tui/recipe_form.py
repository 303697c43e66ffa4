"""The recipe form's fields, read from the recipe dataclass itself (`LoraRecipe`): name, default,
the docstring under each field, and the choices where the recipe module names them.

Validation stays the appliance's: the form turns text into typed values and hands them to
`recipe_from_dict`, whose bounds and messages are those of `airlock train lm --recipe`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any

from appliance.errors import AirlockError


class FormValueError(AirlockError):
    """A form field's text is not a value of the field's type."""


@dataclass(frozen=True)
class RecipeField:
    name: str
    kind: str
    """bool | int | float | str | names (a list of module names, or "auto")."""
    default: Any
    doc: str
    choices: tuple[str, ...] = ()

    @property
    def default_text(self) -> str:
        if self.default is None:
            return ""
        if isinstance(self.default, tuple):
            return ", ".join(self.default)
        return str(self.default)


def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} from the string literal under each annotated field in the class source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in zip(body, [*body[1:], None], strict=True):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def recipe_fields(cls: type) -> list[RecipeField]:
    from appliance.train import recipe

    choices = {"schedule": recipe.SCHEDULES, "precision": recipe.PRECISIONS, "quantization": recipe.QUANTIZATIONS}
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append(RecipeField(f.name, _kind(str(f.type)), default, docs.get(f.name, ""),
                               tuple(choices.get(f.name, ()))))
    return out


def _kind(annotation: str) -> str:
    """The annotation (a string: the recipe modules use `from __future__ import annotations`) as a form kind."""
    first = annotation.split("|")[0].strip()
    if first.startswith("tuple"):
        return "names"
    return first if first in ("bool", "int", "float") else "str"


def parse_value(spec: RecipeField, text: str) -> Any:
    """The typed value of a field's text; the default's type decides (empty text: the default)."""
    text = text.strip()
    if not text:
        return spec.default
    try:
        if spec.kind == "bool":
            return text.lower() in ("1", "true", "yes", "on")
        if spec.kind == "int":
            return int(text.replace("_", ""))
        if spec.kind == "float":
            return float(text)
    except ValueError:
        kind = "a whole number" if spec.kind == "int" else "a number"
        raise FormValueError(f"{spec.name}: {text!r} is not {kind}", hint=spec.doc) from None
    if spec.kind == "names" and text != "auto":
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return text


def build_recipe(cls: type, values: dict[str, Any]) -> Any:
    """The validated recipe, or the appliance's RecipeError (message + hint)."""
    from appliance.train.recipe import recipe_from_dict

    return recipe_from_dict(values, "recipe form", cls)
