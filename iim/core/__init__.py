"""The shared kernel: basics every package may use; imports nothing from the project."""
