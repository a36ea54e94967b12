"""pixart_fast: a lean PixArt-alpha model, Triton kernels and a three-stage trainer.

    from pixart_fast import PixArt, CONFIGS, Diffusion
    model = PixArt(CONFIGS["PixArt-XL/2-256"])          # 610,856,096 parameters, the official repo's names

    import pixart_fast
    report = pixart_fast.patch(diffusers_model)          # the fused kernels in a DiT you already have
    pixart_fast.unpatch(diffusers_model)

The kernels themselves: `from pixart_fast.kernels import modulate, cross_attention, patchify, ...`. The commands:
`python -m pixart_fast.train | sample | extract | export | plan`. Names are imported on first use, so
`import pixart_fast` is cheap and pulls neither transformers nor Triton.
"""
import importlib
import os
from typing import TYPE_CHECKING

# A source checkout used without `pip install` (`python -m pixart_fast.train` from the repository root): pip maps
# train/ and kernels/ to pixart_fast.train and pixart_fast.kernels (pyproject.toml's package-dir), and here Python
# finds them beside this folder. An installed copy has no pyproject.toml beside it and is left as it is.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_checkout, "pyproject.toml")) and os.path.isfile(os.path.join(_checkout, "train",
                                                                                              "__init__.py")):
    __path__.append(_checkout)
del _checkout

if TYPE_CHECKING:  # what editors and type checkers resolve; at run time each name is imported on first use
    from .checkpoints import (CheckpointDamaged, CheckpointMismatch, from_diffusers, load_any, load_diffusers,
                              load_official, load_safetensors, load_state_dict_strict, save_safetensors,
                              to_diffusers)
    from .diffusion import Diffusion
    from .model import CONFIGS, DiT, PixArt, PixArtConfig, reparameterize
    from .patcher import patch, unpatch
    from .text import TextEncoder

# name -> the module that defines it
_EXPORTS = {
    "PixArt": "model", "PixArtConfig": "model", "CONFIGS": "model", "DiT": "model", "reparameterize": "model",
    "Diffusion": "diffusion",
    "TextEncoder": "text",
    "load_any": "checkpoints", "load_safetensors": "checkpoints", "load_official": "checkpoints",
    "load_diffusers": "checkpoints", "load_state_dict_strict": "checkpoints", "save_safetensors": "checkpoints",
    "to_diffusers": "checkpoints", "from_diffusers": "checkpoints", "CheckpointMismatch": "checkpoints",
    "CheckpointDamaged": "checkpoints",
    "patch": "patcher", "unpatch": "patcher",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pixart_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # the next access skips __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
