"""Built-in variants; importing this package registers them. A new variant is one file here
plus one import line below."""

from . import lora, pissa, dora, delora, hra, ia3, ia3_ff, road, lora_xs, eva  # noqa: F401
from . import antipasto, antipasto_rot, antipasto_corda, antipasto_asvd, antipasto_ablate  # noqa: F401
from . import antipasto_dplr  # noqa: F401
from . import vera  # noqa: F401
