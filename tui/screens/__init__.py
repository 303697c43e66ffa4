"""One module per screen; `tui.app` installs them as modes (one screen stack per nav entry)."""
