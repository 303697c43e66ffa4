"""The operator's Textual terminal UI. Imports `appliance`; `appliance` never imports this.

The screens arrive with issue 10; until then `airlock` with no arguments prints its help.
"""
