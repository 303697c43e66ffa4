"""The UI's stylesheet (Textual CSS). Kept in Python, not a .tcss file, so that it ships inside the
wheel without package-data settings: a bundle installs the appliance from its wheel.

Works at 80x24 and with NO_COLOR: state is never shown by colour alone.
"""

STYLESHEET = """
Screen {
    layout: vertical;
}

.screen-note {
    height: auto;
    padding: 0 1;
    text-style: bold;
}

.section-title {
    margin-top: 1;
    text-style: bold underline;
}

.placeholder {
    padding: 1 2;
}

.home-value {
    width: 1fr;
}

/* --- fields: one line each (compact inputs), label on the left ------------------------------- */

.field {
    height: 1;
    margin: 0 1;
}

.field-label {
    width: 12;
    text-style: bold;
}

.field Input {
    width: 1fr;
}

.field Select {
    width: 1fr;
    margin-left: 1;
}

Input.-textual-compact {
    background: $boost;
}

/* --- dialogs ----------------------------------------------------------------------------------- */

.dialog-screen {
    align: center middle;
}

.dialog {
    width: 72;
    max-width: 100%;
    height: auto;
    max-height: 100%;
    border: thick $primary;
    background: $surface;
    padding: 0 1;
}

.error-dialog {
    border: thick $error;
}

.dialog-title {
    text-style: bold reverse;
    padding: 0 1;
    margin-bottom: 1;
}

.dialog Button {
    margin-top: 1;
}

#error-hint, #login-error, #confirm-feedback {
    margin-top: 1;
}

.login-dialog .field {
    margin: 0 0 1 0;
}

.help-dialog {
    width: 76;
    height: 20;
}

/* --- home -------------------------------------------------------------------------------------- */

#home-body {
    padding: 0 1;
}

.home-line {
    height: auto;
}

.home-key {
    width: 11;
    text-style: bold;
}

#emergency-banner {
    border: heavy $warning;
    padding: 0 1;
    text-style: bold;
}

/* --- data -------------------------------------------------------------------------------------- */

#datasets, #runs, #audit {
    height: 1fr;
}

#versions {
    height: auto;
    max-height: 6;
}

#ds-header, #report-summary {
    height: auto;
    padding: 0 1;
}

#problems {
    height: 1fr;
}

#wizard-top {
    height: 9;
}

#tree {
    width: 1fr;
}

#preview-box {
    width: 1fr;
    border-left: vkey $panel;
    padding: 0 1;
}

#dry-run-summary {
    height: auto;
    padding: 0 1;
}

#dry-run-problems {
    height: 1fr;
    min-height: 3;
}

/* --- train ------------------------------------------------------------------------------------- */

#recipe {
    height: 1fr;
    padding: 0 1;
}

.recipe-row {
    height: auto;
}

.recipe-name {
    width: 20;
}

.recipe-row Input, .recipe-row Select {
    width: 12;
}

.recipe-doc {
    width: 1fr;
    padding-left: 1;
    color: $text-muted;
}

#recipe-check, #verify-result {
    height: auto;
    padding: 0 1;
}

.-bad {
    text-style: bold;
}

/* --- job --------------------------------------------------------------------------------------- */

#job-run, #job-curve-text {
    height: auto;
    padding: 0 1;
}

#job-progress-line {
    height: auto;
    padding: 0 1;
}

#job-progress-text {
    width: 1fr;
    margin-left: 1;
}

#job-sparkline {
    height: 3;
    margin: 0 1;
}

#job-plot {
    height: 1fr;
    min-height: 8;
}

#job-log {
    height: 1fr;
    min-height: 3;
    border-top: hkey $panel;
}

/* --- forms, models, serve, schedule ----------------------------------------------------------- */

.form-row {
    height: 1;
    margin-top: 1;
}

.form-label {
    width: 12;
    text-style: bold;
}

.form-row Input, .form-row Select {
    width: 1fr;
}

.form-note {
    padding-left: 12;
    color: $text-muted;
}

.dialog-note {
    margin-top: 1;
    color: $text-muted;
}

.secret {
    margin: 1 0;
    text-style: bold;
    border: round $accent;
    padding: 0 1;
}

#versions {
    height: 1fr;
}

#unregistered {
    height: auto;
    max-height: 6;
}

#version-body {
    height: 1fr;
    padding: 0 1;
}

#version-summary {
    height: auto;
}

.serve-line {
    height: auto;
    padding: 0 1;
}

#keys {
    height: 1fr;
}

#schedules {
    height: auto;
    max-height: 8;
}

#schedule-detail-box {
    height: 1fr;
    padding: 0 1;
    border-top: hkey $panel;
}

/* The login hides what is underneath: after an auto-lock that may be a report with file names. */
LoginScreen {
    background: $background;
}
"""
