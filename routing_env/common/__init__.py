"""Helpers every stage shares: the command line and configs, run identity, safe files, tables, stats, plots.

Imports nothing: each module is imported by name, so a light one never loads a heavy neighbour."""
