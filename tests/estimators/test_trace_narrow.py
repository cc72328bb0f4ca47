"""Tracer gaps of the zoo (issue 27): a step whose operations change with the sequence length (the torch fallbacks of
SSM / linear-attention kernels loop over tokens or chunks) is traced at the real length, in a region of one length
(batches from 2 up; batch 1 on its own), with its cost bounded and said; boolean masks known from the batch index
tensors computed from the weights; heterogeneous configs' per-layer attributes are read per layer."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from optimem.estimators import estimate  # noqa: E402
from optimem.estimators.catalog import resolve  # noqa: E402
from optimem.estimators.errors import TraceFailure  # noqa: E402
from optimem.estimators.inventory import build_config  # noqa: E402
from optimem.estimators.errors import UserError  # noqa: E402
from optimem.estimators.step_memory import max_micro_batch, max_seq_len  # noqa: E402
from optimem.estimators.trace import run as trace_run  # noqa: E402
from optimem.estimators.trace.data import from_arrays, to_arrays  # noqa: E402
from optimem.estimators.trace.meta_kernels import cpp_meta_kernels  # noqa: E402
from optimem.estimators.trace.setting import TraceSetting  # noqa: E402
from optimem.estimators.trace.tensor import Recorder, TraceMode, TraceTensor, from_real, set_recorder  # noqa: E402
from optimem.estimators.zoo import zoo_config_path  # noqa: E402

MAMBA = str(zoo_config_path("mamba"))


def test_a_step_that_loops_over_tokens_is_traced_at_its_sequence_length():
    """Mamba's reference scan runs one op sequence per token: the region narrows to the one length (batches from 2
    up), batch 1 is traced at that length on its own, the notes say so, a batch search reuses the region, and the
    on-disk form keeps what the trace depends on."""
    e2 = estimate(MAMBA, "adamw_torch", batch_size=2, seq_len=48)
    assert any("traced at sequence length 48 itself" in n for n in e2.notes), e2.notes
    st = trace_run.step_trace(resolve(MAMBA), TraceSetting(attn="sdpa"), 2, 48)
    assert st.depends == "seq"
    region = st.region(5, 48)
    assert (region.b_lo, region.b_hi, region.s_lo, region.s_hi) == (2, None, 48, 48) and region.seconds > 0
    assert st.region(2, 49) is None
    e1 = estimate(MAMBA, "adamw_torch", batch_size=1, seq_len=48)
    assert e1.bytes["peak"] < e2.bytes["peak"] < estimate(MAMBA, "adamw_torch", batch_size=3, seq_len=48).bytes["peak"]
    st = trace_run.step_trace(resolve(MAMBA), TraceSetting(attn="sdpa"), 1, 48)
    assert st.region(1, 48).b_hi == 1 and st.region(2, 48) is region
    back = from_arrays(to_arrays(st), st.key)
    assert back.depends == "seq" and [r.seconds for r in back.regions] == [r.seconds for r in st.regions]
    assert max_micro_batch(e2.setup, e2.bytes["peak"]) == 2
    with pytest.raises(UserError, match="cannot search the longest sequence"):  # each length would be a trace
        max_seq_len(e2.setup, 1, 2**40)


def test_a_narrowed_trace_predicted_to_take_too_long_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(trace_run, "MAX_SHAPE_TRACE_S", 0.001)
    with pytest.raises(TraceFailure) as info:
        estimate(MAMBA, "adamw_torch", batch_size=2, seq_len=200)
    msg = str(info.value)
    assert "sequence length 200" in msg and "estimate a shorter sequence" in msg and "\n" not in msg


def test_a_mask_from_the_batch_indexes_a_tensor_computed_from_the_weights():
    """``embeds[ids == token]`` (audio and image placeholders): the mask's values give the shape."""
    rec = Recorder()
    old = set_recorder(rec)
    rec.active = True
    try:
        with cpp_meta_kernels(), TraceMode():
            ids = from_real(torch.tensor([[5, 7, 5, 1], [5, 2, 3, 4]]))
            embeds = TraceTensor(torch.empty(2, 4, 8, device="meta"))  # no shadow: values unknown
            picked = embeds[ids == 5]
            embeds[ids == 7] = torch.zeros(1, 8)
    finally:
        rec.active = False
        set_recorder(old)
    assert tuple(picked.shape) == (3, 8)
    assert any(e[0] == "a" and e[2] == 3 * 8 * 4 for e in rec.events)


def test_per_layer_attributes_of_a_heterogeneous_config_are_read_per_layer():
    """NeoMME's ``sliding_window`` differs per layer: reading it on the global config raises in transformers."""
    config = build_config(resolve(str(zoo_config_path("neomme"))))
    assert trace_run.per_layer_configs(config)
    assert isinstance(trace_run.windows(config), tuple)


def test_a_cpu_run_whose_peak_is_the_model_construction():
    """GPT-1 builds each layer's causal mask from ``torch.ones(n_positions, n_positions)`` twice (``__init__`` and
    ``_init_weights``): the harness measured that run's peak, 4,378,240 B, in its model_load phase
    (results/zoo_cpu.jsonl, openai-gpt); a CUDA estimate has no load phase (the model is built on the host)."""
    e = estimate(str(zoo_config_path("openai-gpt")), "adamw_torch", batch_size=2, seq_len=64, device="cpu")
    assert e.peak_phase == "model_load" and e.bytes["peak"] == e.phases["model_load"]["peak"] == 4_378_240
    assert "model_load" not in estimate(str(zoo_config_path("openai-gpt")), "adamw_torch", batch_size=2,
                                        seq_len=64, device="cuda").phases


def test_layerdrop_is_traced_with_every_layer():
    """M2M100 skips each layer with probability 0.05 in training (a ``torch.rand`` draw per layer): the trace runs
    every layer -- one program for every shape, no narrowing -- and the notes say the estimate is that largest step."""
    path = str(zoo_config_path("m2m_100"))
    e = estimate(path, "adamw_torch", batch_size=2, seq_len=32, task="seq2seq-lm")
    assert any(n.startswith("LayerDrop (") and "every layer runs" in n for n in e.notes), e.notes
    assert not any("traced at sequence length" in n for n in e.notes)
