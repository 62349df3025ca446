"""SQLite for several processes at once (the embedded default): see base.py."""
