"""lora-lite: parameter-efficient adapters attached to linear layers with forward hooks.

Every built-in variant's config is exported by its class name (`ll.LoRAConfig`,
`ll.PiSSAConfig`, ...), read from the registry: a variant file added to `variants/` is exported
with no line here.
"""

from ._version import __version__
from .checkpoint import Adapter, CheckpointError, adapter_of, load, read, save, swap
from .combine import combine
from .config import CONFIGS, AdapterConfig, RankConfig, ScaledConfig
from .merge import disabled, merge, scaled
from .runtime import attach, describe, detach, reconfigure
from .variant import REGISTRY, ParamSpec, Variant, register
from . import variants as _variants  # noqa: F401  (registers the built-in variants)
from .interop.peft import export_peft, import_peft
from .interop.peft_config import from_peft_config

__all__ = [
    "__version__", "attach", "detach", "describe", "reconfigure", "save", "load", "read", "Adapter",
    "CheckpointError",
    "merge", "disabled", "scaled", "combine", "adapter_of", "swap", "export_peft", "import_peft",
    "from_peft_config",
    "AdapterConfig", "RankConfig", "ScaledConfig", "REGISTRY", "ParamSpec", "Variant", "register",
]
for _cfg in CONFIGS.values():  # the built-in variants' configs, by class name
    if _cfg.__module__.startswith(f"{__name__}.variants."):
        globals()[_cfg.__name__] = _cfg
        __all__.append(_cfg.__name__)
del _cfg
