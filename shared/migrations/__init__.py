"""Numbered SQL migrations of the event log, applied in order by shared.eventlog.apply_migrations."""
