"""Data sets for multi-task and few-shot dense prediction.

``SyntheticScenes``: procedurally generated, ray-cast 3-D scenes with
Taskonomy- and PASCAL-style dense labels, made on the fly (no downloads;
see its docstring for the label conventions).
"""
from fastdense.data.synthetic import SyntheticScenes

__all__ = ["SyntheticScenes"]
