"""Model code: single-device, imports nothing from deepspeed, ray, submitit or wandb."""

from lamamba_dist.models.dit import DiT
from lamamba_dist.models.lamamba import LaMambaArch, LaMambaDiff
from lamamba_dist.models.registry import MODELS, build_from_weights, create_model, list_models, load_state_dict_strict

__all__ = ["DiT", "LaMambaArch", "LaMambaDiff", "MODELS", "build_from_weights", "create_model", "list_models",
           "load_state_dict_strict"]
