"""One real Trainer run's optimizer state (bytes, walked by :mod:`optimem.harness.state_walker`) beside the
estimate of the same configuration: the exactness tests' check and ``python -m optimem.harness.validate_peft``'s."""
from __future__ import annotations

from dataclasses import dataclass

from optimem.estimators import estimate
from optimem.estimators.bnb_layout import model_storage_tensors
from optimem.harness.scenario import RunConfig, build_trainer, unwrap_optimizer
from optimem.harness.state_walker import StateMeasure, measure_optimizer_state, storage_bytes
from optimem.harness.units import rel_error


@dataclass
class StateComparison:
    """Measured vs predicted optimizer-state bytes for one configuration."""

    config: RunConfig
    measured: StateMeasure
    predicted: dict[str, int]
    breakdown: dict[str, int]

    @property
    def rel_error(self) -> float:
        """(predicted - measured) / measured; 0 when both are 0."""
        return rel_error(self.predicted["optimizer_state"], self.measured.total)

    def describe(self) -> str:
        return (f"{self.config.optim} on {self.config.model} {self.config.dtype} args={self.config.optim_args!r}: "
                f"measured {self.measured.total} B {self.measured.by_key}, predicted "
                f"{self.predicted['optimizer_state']} B {self.breakdown}")


ADAPTER_FIELDS = ("lora", "quantize", "double_quant", "quant_compute_dtype", "quant_skip_modules", "prepare_kbit",
                  "gradient_checkpointing")


def adapter_fields(cfg) -> dict:
    """A LoRA/QLoRA run's adapter and quantization fields (none for a full fine-tune)."""
    return {f: getattr(cfg, f) for f in ADAPTER_FIELDS} if cfg.peft else {}


def weight_storage_bytes(model) -> int:
    """Unique storage bytes of what holds a model's weights: its parameters and, for a bitsandbytes-quantized
    model, the quantization state beside them (``optimem.estimators.bnb_layout.model_storage_tensors``)."""
    return storage_bytes(model_storage_tensors(model))


def compare_state(cfg: RunConfig) -> StateComparison:
    """Train ``cfg.steps`` real steps, walk the optimizer, and estimate the same configuration."""
    trainer = build_trainer(cfg)
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    measured = measure_optimizer_state(opt, exclude=list(trainer.model.parameters()))
    est = estimate(cfg.model, cfg.optim, dtype=cfg.dtype, optim_args=cfg.optim_args,
                   optim_target_modules=cfg.optim_target_modules, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                   **adapter_fields(cfg))
    return StateComparison(cfg, measured, est.bytes, est.state_breakdown)
