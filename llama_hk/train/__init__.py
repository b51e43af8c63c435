"""Training: the pure step (step), the run over hooks (loop), and what the run is made of: its settings
(configs), starting state (state), checkpoints (checkpointing), hooks, metrics and dry run."""

from llama_hk.train.checkpointing import Checkpointer
from llama_hk.train.configs import CheckpointConfig, EvalConfig, LoopConfig
from llama_hk.train.dry_run import memory_report
from llama_hk.train.hooks import CheckpointHook, EvalHook, Hook, LogHook, NanGuard, OperativeConfigHook
from llama_hk.train.loop import train
from llama_hk.train.metrics import MetricsWriter, bits_per_byte, flops_per_token, mfu
from llama_hk.train.step import (TrainState, Optimizer, init_state, learning_rate_schedule, make_eval_step,
                                 make_optimizer, make_train_step, masked_losses, weight_decay_mask)

__all__ = ["CheckpointConfig", "CheckpointHook", "Checkpointer", "EvalConfig", "EvalHook", "Hook", "LogHook",
           "LoopConfig", "MetricsWriter", "NanGuard", "OperativeConfigHook", "Optimizer", "TrainState",
           "bits_per_byte", "flops_per_token", "init_state", "learning_rate_schedule", "make_eval_step",
           "make_optimizer", "make_train_step", "masked_losses", "memory_report", "mfu", "train",
           "weight_decay_mask"]
