"""Multiple-choice QA data: task loading (:mod:`.tasks`), tensor encoding (:mod:`.encode`) and a split encoded once (:mod:`.encoded`)."""

from __future__ import annotations

from .encode import LETTERS, MCBatch, encode_letter_prompt, encode_pairs, letter_prompt_text, move, pad_token_id
from .encoded import EncodedSplit
from .tasks import (
    DATA_ENV_VAR,
    MIXTURES,
    SPLITS,
    TASKS,
    DataError,
    MCExample,
    MixtureSpec,
    TaskSpec,
    load_builtin,
    load_file,
    resolve_data_dir,
    task_names,
)
from .sources import SINGLE_FILE_FRACTIONS, TaskSource, describe_split, load_task, resolve_task

__all__ = [
    "DATA_ENV_VAR",
    "SINGLE_FILE_FRACTIONS",
    "TaskSource",
    "describe_split",
    "resolve_task",
    "LETTERS",
    "MIXTURES",
    "MixtureSpec",
    "SPLITS",
    "TASKS",
    "DataError",
    "EncodedSplit",
    "MCBatch",
    "MCExample",
    "TaskSpec",
    "encode_letter_prompt",
    "encode_pairs",
    "letter_prompt_text",
    "load_builtin",
    "load_file",
    "load_task",
    "move",
    "pad_token_id",
    "resolve_data_dir",
    "task_names",
]
