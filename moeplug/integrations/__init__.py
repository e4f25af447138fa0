"""Glue for training frameworks (the only place moeplug imports them)."""
