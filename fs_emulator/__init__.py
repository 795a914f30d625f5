"""FreeSWITCH emulator (placeholder, built next)."""
