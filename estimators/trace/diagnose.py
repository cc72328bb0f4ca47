"""When a trace fails: the same step on small real CPU tensors, to tell a tracer gap from a model that fails on
its own (:func:`explain`).

The real step is the trace's own: the model built from the same config, head, dtype, attention implementation
and checkpointing (:func:`optimem.estimators.inventory.instantiate` on the CPU), ``use_cache`` off, training mode,
the harness's synthetic batch (:func:`~optimem.estimators.trace.step.real_batch`, batch :data:`BATCH` x sequence
:data:`SEQ`: the first shape a trace runs), forward with labels and ``backward()``. It is tried only for models of
at most :data:`MAX_PARAMS` parameters (their fp32 weights and gradients fit a small machine); a PEFT setting is not
tried (the message says the check was not made).
"""
from __future__ import annotations

import warnings

from ..catalog import ModelSource
from ..errors import TraceFailure, UserError
from .setting import TraceSetting
from ..inventory import instantiate
from ..sample_tokens import closing_token, vocab_size

BATCH, SEQ = 2, 16
MAX_PARAMS = 200_000_000
"""Largest model (parameters) the real-tensor check builds: 200M fp32 parameters and their gradients are 1.6 GB."""


def _one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def real_step_error(source: ModelSource, setting: TraceSetting) -> str | None:
    """None when one training micro-step of ``source`` x ``setting`` runs on small real CPU tensors, else the
    model's own error in one line. Raises :class:`LookupError` when the check cannot be made (too large, PEFT)."""
    import torch  # lazy: pulls in torch, which importing this module does not

    from .step import real_batch  # lazy: pulls in torch, which importing this module does not
    from .model import ModelFacts  # lazy: pulls in torch, which importing this module does not

    if setting.peft:
        raise LookupError("a PEFT setting is not checked on real tensors")
    task = None if setting.task in (None, "causal-lm") else setting.task
    meta = instantiate(source, device="meta", task=task)
    n = sum(p.numel() for p in meta.parameters())
    if n > MAX_PARAMS:
        raise LookupError(f"{n:,} parameters is more than the real-tensor check builds ({MAX_PARAMS:,})")
    del meta
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = instantiate(source, device="cpu", dtype=setting.dtype, task=task)
        try:
            model.set_attn_implementation(setting.attn)
        except (ValueError, ImportError, AttributeError):
            pass
        if setting.gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = model.config
    cfg.use_cache = False
    model.train()
    facts = ModelFacts(False, False, bool(getattr(cfg, "is_encoder_decoder", False)), vocab_size(cfg), "",
                       int(getattr(cfg, "num_labels", 2) or 2), getattr(model, "main_input_name", "input_ids"),
                       closing_token(cfg))
    batch = real_batch(facts, BATCH, SEQ, setting.task, packed=bool(getattr(setting, "packed", False)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model(**batch)
            loss = out["loss"] if isinstance(out, dict) else out[0]
            loss.backward()
    except Exception as exc:  # noqa: BLE001 - the model's own error, as one line
        return _one_line(exc)
    return None


def explain(source: ModelSource, setting: TraceSetting, trace_message: str) -> TraceFailure:
    """The one-line failure for a trace that raised ``trace_message`` ("cannot trace NAME: ..."): says whether
    the model fails on its own on real CPU tensors (with its error) or the tracer has a gap."""
    try:
        err = real_step_error(source, setting)
    except LookupError as exc:
        return TraceFailure(f"{trace_message} (not checked on real tensors: {exc})", "unchecked")
    except UserError as exc:
        return TraceFailure(f"{trace_message} (the model cannot be built on the CPU either: {exc})", "model")
    except Exception as exc:  # noqa: BLE001 - the check itself failed: say so, never a traceback
        return TraceFailure(f"{trace_message} (the real-tensor check failed to run: {_one_line(exc)})", "unchecked")
    if err is not None:
        return TraceFailure(f"{source.name} fails on its own: the same training step on small real CPU tensors "
                            f"raises {err} (a model/config error, not optimem's; the tracer said: "
                            f"{trace_message.split(': ', 1)[-1]})", "model")
    return TraceFailure(f"{trace_message} (a tracer gap: the same step runs on small real CPU tensors; please report "
                        "it)", "tracer")


__all__ = ["BATCH", "MAX_PARAMS", "SEQ", "explain", "real_step_error"]
