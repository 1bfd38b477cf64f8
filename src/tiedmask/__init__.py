"""tiedmask: weight-tied vision networks with per-application static sparse masks.

The research core is `tiedmask.core` (masks, layers, cells, execution, DEQ, backbones,
presets); one run's settings, data, directory and loop are `tiedmask.training`; many runs,
reports and the demo are `tiedmask.experiments`; CKA analysis is `tiedmask.analysis`.
"""

from .core.presets import create_model, register_model
from .core.spec import DataShape, DeqConfig, MaskConfig, ModelConfig
from .errors import ConfigError, DataError, TiedmaskError
from .training.settings import TrainConfig, load_config
from .training.train import Result, train

__all__ = ["ConfigError", "DataError", "DataShape", "DeqConfig", "MaskConfig", "ModelConfig", "Result",
           "TiedmaskError", "TrainConfig", "create_model", "load_config", "register_model", "train"]
__version__ = "0.2.0"
