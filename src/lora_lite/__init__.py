"""lora-lite: parameter-efficient adapters attached to linear layers with forward hooks."""

from ._version import __version__
from .checkpoint import Adapter, CheckpointError, adapter_of, load, read, save, swap
from .combine import combine
from .config import AdapterConfig, RankConfig, ScaledConfig
from .merge import disabled, merge, scaled
from .runtime import attach, describe, detach, reconfigure
from .variant import REGISTRY, ParamSpec, Variant, register
from . import variants as _variants  # noqa: F401  (registers the built-in variants)
from .variants.antipasto import AntiPaSTOConfig
from .variants.antipasto_ablate import AntiPaSTOAblateConfig
from .variants.antipasto_asvd import AntiPaSTOASVDConfig
from .variants.antipasto_corda import AntiPaSTOCorDAConfig
from .variants.antipasto_dplr import AntiPaSTODPLRConfig
from .variants.antipasto_rot import AntiPaSTORotConfig
from .variants.delora import DeLoRAConfig
from .variants.dora import DoRAConfig
from .variants.eva import EVAConfig
from .variants.hra import HRAConfig
from .variants.ia3 import IA3Config
from .variants.ia3_ff import IA3FFConfig
from .variants.lora import LoRAConfig
from .variants.lora_xs import LoRAXSConfig
from .variants.pissa import PiSSAConfig
from .variants.road import RoadConfig
from .interop.peft import export_peft, import_peft

__all__ = [
    "__version__", "attach", "detach", "describe", "reconfigure", "save", "load", "read", "Adapter",
    "CheckpointError",
    "merge", "disabled", "scaled", "combine", "adapter_of", "swap", "export_peft", "import_peft",
    "AdapterConfig", "RankConfig", "ScaledConfig", "REGISTRY", "ParamSpec", "Variant", "register",
    "LoRAConfig", "PiSSAConfig", "DoRAConfig", "DeLoRAConfig", "HRAConfig",
    "IA3Config", "IA3FFConfig", "RoadConfig", "LoRAXSConfig", "EVAConfig",
    "AntiPaSTOConfig", "AntiPaSTORotConfig", "AntiPaSTOCorDAConfig", "AntiPaSTOASVDConfig",
    "AntiPaSTOAblateConfig", "AntiPaSTODPLRConfig",
]
