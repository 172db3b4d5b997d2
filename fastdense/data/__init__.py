"""Data sets for multi-task and few-shot dense prediction.

``SyntheticScenes``: procedurally generated, ray-cast 3-D scenes with
Taskonomy- and PASCAL-style dense labels, made on the fly (no downloads;
see its docstring for the label conventions). It is the default data set.

``PascalContextMT``, ``NYUDMT``, ``TaskonomyTiny``: the community's on-disk
layouts (PASCAL_MT, NYUD_MT, Visual Token Matching's Taskonomy); reading their
files needs the ``data`` extra (Pillow, scipy). ``EpisodeSampler`` and
``repeated_evaluation`` drive few-shot training and evaluation.
"""
from fastdense.data import transforms
from fastdense.data._io import CorruptFileError, DatasetNotFoundError
from fastdense.data.episodes import Episode, EpisodeSampler, RepeatedResult, collate_episode, repeated_evaluation
from fastdense.data.nyud import NYUDMT
from fastdense.data.pascal import PascalContextMT
from fastdense.data.synthetic import SyntheticScenes
from fastdense.data.taskonomy import TASKONOMY_FOLDS, TASKONOMY_TASKS, TaskonomyTiny

__all__ = [
    "NYUDMT",
    "TASKONOMY_FOLDS",
    "TASKONOMY_TASKS",
    "CorruptFileError",
    "DatasetNotFoundError",
    "Episode",
    "EpisodeSampler",
    "PascalContextMT",
    "RepeatedResult",
    "SyntheticScenes",
    "TaskonomyTiny",
    "collate_episode",
    "repeated_evaluation",
    "transforms",
]
