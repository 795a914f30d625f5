"""IIM's tests: one folder per package (``tests/fs_app`` for ``fs_app``, ...), shared peers and rigs here."""
