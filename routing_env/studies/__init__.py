"""Experiment drivers over the pipeline (the balancing-strategy comparison).

Imports nothing: each module is imported by name, so a light one never loads a heavy neighbour."""
