"""The documents tell the truth about the code.

* Every `airlock ...` and `airlock-bundle ...` command line in README.md and docs/**/*.md (shell
  code blocks, and inline code spans that start with the command) names a subcommand that exists
  in the Click CLI, and every `--option` on it appears in that subcommand's `--help`; every
  `install.sh --option` is one its argument loop accepts.
* README's first two code blocks are exactly `make demo` and `make test`.
* Relative links (and #anchors into Markdown files) point at things that exist.
* The DICOM de-identification summary in docs/security.md matches appliance/data/annex_e_actions.csv,
  and the operator guide's key table lists every key each TUI screen binds.

The CLIs are walked in-process through their click command objects (no subprocesses), so this
runs in about a second. Usage syntax in the docs is understood: `[--json]`, `auto|jsonl`,
`--engine\\|--onnx` (a pipe escaped inside a Markdown table), `NAME`, `...`.
"""

from __future__ import annotations

import re
import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# Code blocks whose lines are shell (or systemd unit) lines; JSON, TOML and Python blocks are not.
SHELL_BLOCKS = {"", "sh", "bash", "shell", "console", "ini", "systemd"}
PROGRAMS = ("airlock", "airlock-bundle", "install.sh")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class Line:
    doc: Path
    number: int
    text: str
    in_code_block: bool

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.number}"


def markdown_lines(doc: Path) -> list[tuple[Line, str | None]]:
    """Every line with the info string of the fenced block it is in (None outside blocks)."""
    out: list[tuple[Line, str | None]] = []
    fence: str | None = None
    lang: str | None = None
    for number, text in enumerate(doc.read_text(encoding="utf-8").splitlines(), start=1):
        match = FENCE.match(text)
        if match and fence is None:
            fence, lang = match.group(1), match.group(2).lower()
            continue
        if match and fence is not None and text.strip() == fence[0] * len(text.strip()) and \
                len(text.strip()) >= len(fence):
            fence, lang = None, None
            continue
        out.append((Line(doc, number, text, fence is not None), lang))
    return out


def code_blocks(doc: Path) -> list[str]:
    """The contents of the fenced code blocks, in order."""
    blocks: list[list[str]] = []
    previous_in_block = False
    for line, _lang in markdown_lines(doc):
        if line.in_code_block:
            if not previous_in_block:
                blocks.append([])
            blocks[-1].append(line.text)
        previous_in_block = line.in_code_block
    # Two blocks back to back (closing fence, opening fence) would merge above; our docs never do that.
    return ["\n".join(b) for b in blocks]


# --- command lines ---------------------------------------------------------------------------------------------


def _tokens(text: str) -> list[str]:
    try:
        return shlex.split(text, posix=True)
    except ValueError:  # an unbalanced quote in usage text: whitespace is good enough
        return text.split()


def command_in(segment: str) -> list[str] | None:
    """argv of the airlock/airlock-bundle command in one shell segment, or None.

    Accepts what may stand before the program: `sudo`, `sh`, `$ ` prompts, VAR=value assignments, and a
    path to the program (`/opt/airlock/bin/airlock`, `ExecStart=-/opt/airlock/bin/airlock`)."""
    tokens = _tokens(segment)
    for i, token in enumerate(tokens):
        value = token.split("=", 1)[1] if ENV_ASSIGNMENT.match(token) else token
        value = value.lstrip("-@:+!")
        if value.rsplit("/", 1)[-1] in PROGRAMS:
            return [value.rsplit("/", 1)[-1], *tokens[i + 1:]]
        if token in ("sudo", "$", "-E", "sh") or ENV_ASSIGNMENT.match(token):
            continue
        return None
    return None


def commands_in(line: Line, lang: str | None) -> list[str]:
    """The command texts on one Markdown line (code block lines, or inline spans)."""
    if line.in_code_block:
        if lang not in SHELL_BLOCKS:
            return []
        text = line.text.strip()
        if text.startswith("#"):
            return []
        text = re.sub(r"(^|\s)#.*$", "", text)  # a trailing comment
        return [s for s in re.split(r"&&|\|\||;| \| ", text) if s.strip()]
    spans = []
    for match in INLINE_CODE.finditer(line.text):
        span = match.group(2).strip().replace("\\|", "|")
        first = span.split(maxsplit=1)[0] if span else ""
        if first.rsplit("/", 1)[-1] in PROGRAMS or first == "sudo":
            spans.append(span)
    return spans


def _roots() -> dict[str, click.Command]:
    from appliance.cli import cli as airlock_cli
    from bundler.cli import cli as bundle_cli

    return {"airlock": airlock_cli, "airlock-bundle": bundle_cli}


def _subcommand_of(group: click.Group, ctx: click.Context, word: str) -> str | None:
    """The subcommand `word` selects, including groups that redirect (`airlock optimize RUN` runs `run`)."""
    if word in group.commands:
        return word
    if type(group).parse_args is click.Group.parse_args:
        return None
    probe = click.Context(group, info_name=ctx.info_name, parent=ctx.parent, resilient_parsing=True)
    group.parse_args(probe, [word])
    protected = [*getattr(probe, "_protected_args", []), *probe.args]
    return protected[0] if protected and protected[0] in group.commands else None


def _option_names(command: click.Command, ctx: click.Context) -> set[str]:
    names = set(ctx.help_option_names)
    for param in command.get_params(ctx):
        if isinstance(param, click.Option) and not param.hidden:
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def install_sh_options() -> set[str]:
    """The options install.sh's argument loop accepts (`--trust) ...`, `-h|--help) ...`)."""
    text = (REPO / "install.sh").read_text(encoding="utf-8")
    return {opt for line in re.findall(r"^\s+(-[-a-z|]+)\)", text, re.M) for opt in line.split("|")}


def check_install_sh(argv: list[str]) -> list[str]:
    known = install_sh_options()
    used = {piece.split("=", 1)[0] for raw in argv[1:] for piece in raw.strip("[](){}").split("|")
            if piece.startswith("--")}
    return [f"install.sh has no option {name}" for name in sorted(used - known)]


def check_command(argv: list[str]) -> list[str]:
    """What is wrong with one documented command line (empty when it matches the CLI)."""
    if argv[0] == "install.sh":
        return check_install_sh(argv)
    roots = _roots()
    command: click.Command = roots[argv[0]]
    ctx = click.Context(command, info_name=argv[0])
    path = [argv[0]]
    problems = []
    at_leaf = not isinstance(command, click.Group)
    for raw in argv[1:]:
        pieces = [p for p in raw.strip("[](){}").split("|") if p]
        # click's own notation for a flag pair: --pii/--no-pii
        pieces = [q for p in pieces for q in (p.split("/") if all(x.startswith("-") for x in p.split("/")) else [p])]
        for piece in pieces:
            piece = piece.strip("[](){}")
            if piece in ("", "...", "…", "--") or not piece:
                continue
            if piece.startswith("-") and len(piece) > 1 and not piece[1].isdigit():
                name = piece.split("=", 1)[0]
                help_text = command.get_help(ctx)
                if name not in _option_names(command, ctx) or not re.search(rf"(^|[\s,/]){re.escape(name)}\b",
                                                                            help_text, re.M):
                    problems.append(f"`{' '.join(path)}` has no option {name}")
                continue
            if at_leaf or len(pieces) > 1:
                continue  # an argument (or a usage alternative such as auto|cpu)
            assert isinstance(command, click.Group)
            sub = _subcommand_of(command, ctx, piece)
            if sub is None:
                problems.append(f"`{' '.join(path)}` has no subcommand {piece!r} "
                                f"(it has: {', '.join(sorted(command.commands))})")
                return problems
            command = command.commands[sub]
            ctx = click.Context(command, info_name=sub, parent=ctx)
            path.append(sub)
            at_leaf = not isinstance(command, click.Group)
    return problems


def documented_commands() -> list[tuple[Line, str, list[str]]]:
    found = []
    for doc in DOCS:
        for line, lang in markdown_lines(doc):
            for text in commands_in(line, lang):
                argv = command_in(text)
                if argv:
                    found.append((line, text, argv))
    return found


def test_every_documented_command_exists_with_its_options() -> None:
    found = documented_commands()
    assert len(found) > 100, "the extractor found almost no commands: is it broken?"
    offending = []
    for line, text, argv in found:
        offending += [f"{line.where}: {problem}    [{text.strip()}]" for problem in check_command(argv)]
    assert not offending, "stale commands in the docs (fix the docs):\n" + "\n".join(offending)


@pytest.mark.parametrize(("text", "problem"), [
    ("airlock vault frobnicate", "has no subcommand 'frobnicate'"),
    ("airlock data import PATH --name X --colour red", "`airlock data import` has no option --colour"),
    ("airlock optimize RUN --no-such", "`airlock optimize run` has no option --no-such"),
    ("airlock upgrade --record DIR", "`airlock upgrade` has no option --record"),  # hidden: not for people
    ("airlock-bundle verify DIR --trust\\|--nope FP", "has no option --nope"),
    ("sudo ./install.sh --trust FP [--prefix /opt/x] [--force]", "install.sh has no option --force"),
])
def test_the_checker_catches_stale_commands(text: str, problem: str) -> None:
    line = Line(REPO / "README.md", 1, f"`{text}`", in_code_block=False)
    (span,) = commands_in(line, None)
    problems = check_command(command_in(span) or [])
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize("text", [
    "airlock optimize RUN [--recipe quant.toml] [--variants fp32,fp16,int8] [--no-qat] [--wait]",
    "airlock data import PATH --name NAME [--pii/--no-pii]",
    "airlock schedule set TASK --every 7d\\|--cron \"m h dom mon dow\" [--min-new-records N]",
    "airlock --debug vault unlock --user NAME",
])
def test_the_checker_accepts_usage_syntax(text: str) -> None:
    line = Line(REPO / "README.md", 1, f"`{text}`", in_code_block=False)
    (span,) = commands_in(line, None)
    argv = command_in(span)
    assert argv is not None
    assert check_command(argv) == []


def test_commands_are_found_in_code_blocks_after_paths_sudo_and_env() -> None:
    block = Line(REPO / "README.md", 1, "", in_code_block=True)
    for text, argv0 in [("sudo /opt/airlock/bin/airlock doctor", "airlock"),
                        ("AIRLOCK_HOME=/tmp/h airlock vault status --json", "airlock"),
                        ("ExecStart=/opt/airlock/bin/airlock serve $AIRLOCK_SERVE_ARGS", "airlock"),
                        ("ls /var/lib/airlock", None)]:
        segments = commands_in(Line(block.doc, 1, text, True), "sh")
        argv = command_in(segments[0]) if segments else None
        assert (argv[0] if argv else None) == argv0, text


# --- README's first commands -----------------------------------------------------------------------------------


def test_readme_starts_with_make_demo_then_make_test() -> None:
    blocks = code_blocks(REPO / "README.md")
    assert [b.strip() for b in blocks[:2]] == ["make demo", "make test"], blocks[:2]


# --- links -----------------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SRC = re.compile(r"""<(?:img|a)\s[^>]*?(?:src|href)=["']([^"']+)["']""")


def github_anchors(doc: Path) -> set[str]:
    """The #anchors GitHub gives the headings of a Markdown file."""
    seen: Counter[str] = Counter()
    anchors = set()
    for line, _lang in markdown_lines(doc):
        if line.in_code_block:
            continue
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line.text)
        if not match:
            continue
        text = re.sub(r"<[^>]+>", "", match.group(1))
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
        slug = re.sub(r"[^\w\- ]", "", text.lower().replace("`", "")).replace(" ", "-")
        anchors.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return anchors


def test_relative_links_point_at_files_that_exist() -> None:
    broken = []
    for doc in DOCS:
        for line, _lang in markdown_lines(doc):
            if line.in_code_block:
                continue
            text = INLINE_CODE.sub("", line.text)
            for target in [*LINK.findall(text), *HTML_SRC.findall(text)]:
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                    continue  # http:, https:, mailto:
                path_part, _, anchor = target.partition("#")
                resolved = (doc.parent / path_part).resolve() if path_part else doc
                if not resolved.exists():
                    broken.append(f"{line.where}: {target} (no such file)")
                elif REPO not in resolved.parents and resolved != REPO:
                    broken.append(f"{line.where}: {target} (outside the repository)")
                elif anchor and resolved.suffix == ".md" and anchor not in github_anchors(resolved):
                    broken.append(f"{line.where}: {target} (no heading with that anchor)")
    assert not broken, "broken links in the docs:\n" + "\n".join(broken)


# --- the de-identification summary -----------------------------------------------------------------------------

DEID_START, DEID_END = "<!-- annex-e-summary:start -->", "<!-- annex-e-summary:end -->"
ACTION_NAMES = {"X": "remove", "Z": "empty (zero-length value)", "D": "replace with a dummy value", "U": "remap UID",
                "K": "keep", "C": "clean (dates shifted)"}


def deid_summary_table() -> str:
    """The Markdown table docs/security.md must hold between the markers, computed from the action table."""
    from appliance.data.dicom_deid import load_action_table

    table = load_action_table()
    rows = [*table.exact.values(), *(row for _mask, _value, row in table.patterns)]
    basic = Counter(row.basic for row in rows)
    resolved = Counter(row.action for row in rows)
    lines = [f"Rows in the table: {len(rows)} ({len(table.exact)} single tags, {len(table.patterns)} repeating-group "
             "patterns).", "", "| Basic Profile action in Table E.1-1 | rows | applied as |", "|---|---|---|"]
    for code, count in sorted(basic.items(), key=lambda kv: (-kv[1], kv[0])):
        applied = " or ".join(f"`{a}`" for a in sorted({row.action for row in rows if row.basic == code},
                                                         key="XZDU".index))
        lines.append(f"| `{code}` | {count} | {applied} |")
    lines += ["", "| Action after resolving combinations | meaning | rows |", "|---|---|---|"]
    for code, count in sorted(resolved.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"| `{code}` | {ACTION_NAMES[code]} | {count} |")
    keep = sum(1 for row in rows if row.rtn_pat_chars == "K")
    dates = sum(1 for row in rows if row.rtn_long_modif_dates == "C")
    lines += ["", f"Options on by default: Retain Patient Characteristics keeps {keep} attributes (`K`); Retain "
                  f"Longitudinal Temporal Information with Modified Dates shifts {dates} date/time attributes (`C`)."]
    return "\n".join(lines)


def test_security_deid_summary_matches_the_action_table() -> None:
    text = (REPO / "docs" / "security.md").read_text(encoding="utf-8")
    assert DEID_START in text and DEID_END in text, f"docs/security.md lacks the {DEID_START} markers"
    shown = text.split(DEID_START, 1)[1].split(DEID_END, 1)[0].strip()
    expected = deid_summary_table()
    assert shown == expected, ("docs/security.md's de-identification summary is stale; replace the text between "
                               f"the markers with:\n{expected}")


# --- the operator guide's key table ----------------------------------------------------------------------------

GUIDE_ROWS = {"HomeScreen": "Home", "DataScreen": "Data", "DatasetScreen": "Dataset detail",
              "ImportScreen": "Import wizard", "TrainScreen": "Train", "JobScreen": "Job", "ModelsScreen": "Models",
              "VersionScreen": "Version detail", "ServeScreen": "Serve", "ScheduleScreen": "Schedule",
              "AuditScreen": "Audit"}
KEY_NAMES = {"slash": "/", "delete": "Delete", "enter": "Enter", "escape": "Escape"}


def test_operator_guide_lists_every_screen_key() -> None:
    """Each screen's bindings appear in its row of the operator guide's per-screen key table."""
    import importlib

    rows = {}
    for line, _lang in markdown_lines(REPO / "docs" / "operator-guide.md"):
        cells = [c.strip() for c in line.text.strip().strip("|").split("|")] if line.text.startswith("|") else []
        if len(cells) == 2:
            rows[re.sub(r"\s*\(.*\)$", "", cells[0])] = cells[1]
    missing = []
    for module_file in sorted((REPO / "tui" / "screens").glob("*.py")):
        module = importlib.import_module(f"tui.screens.{module_file.stem}")
        for name, title in GUIDE_ROWS.items():
            screen = module.__dict__.get(name)
            if screen is None or screen.__module__ != module.__name__:
                continue
            row = rows.get(title)
            if row is None:
                missing.append(f"no row '{title}' for {name}")
                continue
            for binding in screen.BINDINGS:
                for key in binding.key.split(","):
                    shown = KEY_NAMES.get(key, key)
                    if f"`{shown}`" not in row:
                        missing.append(f"{title}: key {shown} ({binding.description or binding.action})")
    assert not missing, "docs/operator-guide.md's key table is stale:\n" + "\n".join(missing)
