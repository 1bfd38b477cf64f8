"""tiedmask: weight-tied vision networks with per-application static sparse masks."""

from .config import TrainConfig, load_config
from .errors import ConfigError, DataError, TiedmaskError
from .models import ModelConfig, create_model, register_model
from .train import Result, train

__all__ = ["ConfigError", "DataError", "ModelConfig", "Result", "TiedmaskError", "TrainConfig",
           "create_model", "load_config", "register_model", "train"]
__version__ = "0.1.0"
