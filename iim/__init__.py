"""IIM service assembly: settings, CLI and the running service."""
