"""bitsandbytes' storage of a quantized weight, read off the tensors (no torch or bitsandbytes import): its kind
(``nf4``/``fp4``/``int8``), the logical shape it stands for, and the quantization-state tensors beside it.
"""
from __future__ import annotations


def quant_state_tensors(param, module=None) -> list:
    """The tensors bitsandbytes keeps beside a quantized weight's data: a 4-bit weight's ``quant_state``
    (absmax, code, and with double quantization the offset and the nested absmax and code), an 8-bit weight's
    row scales ``SCB`` (on the weight until the layer's first forward, then on the layer's ``state``:
    ``module``)."""
    out = []
    qs = getattr(param, "quant_state", None)
    if qs is not None and hasattr(qs, "absmax"):
        out += [qs.absmax, qs.code]
        if getattr(qs, "nested", False) and qs.state2 is not None:
            out += [qs.offset, qs.state2.absmax, qs.state2.code]
    scb = getattr(param, "SCB", None)
    if scb is None and module is not None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is not None:
        out.append(scb)
    return [t for t in out if t is not None]


def quant_kind(param) -> str | None:
    """``nf4``/``fp4``/``int8`` for a bitsandbytes-quantized parameter, else None."""
    name = type(param).__name__
    if name == "Params4bit":
        return getattr(param, "quant_type", "nf4")
    if name == "Int8Params" and not getattr(param, "has_fp16_weights", False):
        return "int8"
    return None


def logical_shape(param) -> tuple[int, ...]:
    """The shape of the weight a quantized parameter stands for (its own shape when not quantized)."""
    qs = getattr(param, "quant_state", None)
    if type(param).__name__ == "Params4bit" and qs is not None and getattr(qs, "shape", None) is not None:
        return tuple(int(s) for s in qs.shape)
    return tuple(int(s) for s in param.shape)


def model_storage_tensors(model) -> list:
    """Every tensor that stores the model's weights: its parameters and the quantization state beside them."""
    out = []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            out.append(p)
            if quant_kind(p) is not None:
                out += quant_state_tensors(p, module)
    return out
