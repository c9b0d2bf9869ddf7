"""Stages 1 and 3: the fine-tune loop, routing supervision, training state, evaluation, the demo warm-up.

Imports nothing: each module is imported by name, so a light one never loads a heavy neighbour."""
