"""tiedmask: weight-tied vision networks with per-application static sparse masks.

The research core is `tiedmask.core` (masks, layers, cells, execution, DEQ, backbones,
presets, and `tie` for the repeated blocks of any model); one run's settings, data, directory and loop are `tiedmask.training`; many runs,
reports and the demo are `tiedmask.experiments`; CKA analysis is `tiedmask.analysis`.
"""

from .core.presets import ModelSpec, create_model, register_model, spec
from .core.spec import DataShape, DeqConfig, MaskConfig, ModelConfig, TieConfig
from .core.tie import tie
from .core.tie_io import load_tied, save_tied
from .core.tied_block import tie_summary
from .core.untie import untie
from .errors import ConfigError, DataError, TiedmaskError
from .training.settings import TrainConfig, load_config
from .training.result import Result
from .training.train import train

__all__ = ["ConfigError", "DataError", "DataShape", "DeqConfig", "MaskConfig", "ModelConfig", "Result",
           "TieConfig", "TiedmaskError", "TrainConfig", "create_model", "load_config", "load_tied",
           "ModelSpec", "register_model", "spec", "save_tied", "tie", "tie_summary", "train", "untie"]
__version__ = "0.2.0"
