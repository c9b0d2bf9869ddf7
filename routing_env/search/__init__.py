"""Stage 2: searching routes (the ``train_rl.py`` loop and its settings) and the routing gate.

Imports nothing: each module is imported by name, so a light one never loads a heavy neighbour."""
