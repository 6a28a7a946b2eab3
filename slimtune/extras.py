"""Optional libraries (the pip extras): each `require_*` imports one on demand and returns it, or raises the
`SlimtuneError` that names the extra to install. Imported inside the functions that need them, so that a module
using them imports without them (the method registry imports every method, used or not)."""

from __future__ import annotations

from slimtune.errors import SlimtuneError


def require_peft():
    try:
        import peft
    except ImportError:
        raise SlimtuneError("method=lora and method=qlora need peft: pip install 'slimtune[hf]'") from None
    return peft


def require_bitsandbytes(what: str):
    try:
        import bitsandbytes
    except ImportError:
        raise SlimtuneError(f"{what} needs bitsandbytes, which is not installed: pip install 'slimtune[qlora]'") \
            from None
    return bitsandbytes


def require_torchao(what: str):
    import slimtune.models.hf  # noqa: F401  (quiets torchao's import-time logging)

    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError:
        raise SlimtuneError(f"{what} needs torchao, which is not installed: pip install 'slimtune[torchao]'") from None
    return nf4_tensor
