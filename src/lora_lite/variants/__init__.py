"""Built-in variants; importing this package registers them. A new variant is one file here
plus one import line below."""

from . import lora, pissa, dora, delora, hra, ia3, ia3_ff, road, lora_xs  # noqa: F401
