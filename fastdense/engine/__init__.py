"""Training and evaluation: trainer, losses, checkpoints and DDP helpers."""
from fastdense.engine.checkpoint import load_checkpoint, restore, save_checkpoint
from fastdense.engine.fewshot import EpisodicConfig, EpisodicTrainer, SYNTHETIC_FOLDS, synthetic_sampler
from fastdense.engine.trainer import (MultiTaskTrainer, beats, constant_baseline, evaluate_constant, ResumableSampler,
                                      TrainConfig, make_optimizer,
                                      make_scheduler, prediction_grid, warmup_cosine, write_png)

__all__ = ["MultiTaskTrainer", "beats", "constant_baseline", "evaluate_constant", "ResumableSampler", "TrainConfig",
           "load_checkpoint", "make_optimizer",
           "make_scheduler", "prediction_grid", "restore", "save_checkpoint", "warmup_cosine", "write_png",
           "EpisodicConfig", "EpisodicTrainer", "SYNTHETIC_FOLDS", "synthetic_sampler"]
