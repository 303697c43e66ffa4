"""The operator's Textual terminal UI. Imports `appliance`; `appliance` never imports this.

`airlock` with no arguments (in a terminal) or `airlock tui` opens it. Screens call appliance
functions from thread workers and read the catalog; every long piece of work is a job process,
so closing the UI never stops anything, and reopening it re-attaches. Entry point: `tui.app.run`.
"""
