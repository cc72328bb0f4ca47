"""fp16's GradScaler in CUDA estimates (estimators/grad_scaler.py): the step holds exactly the scaler's bytes the
rule names, in the phases and allocations it names; bf16 and CPU estimates hold none."""
from dataclasses import replace

from optimem.estimators import grad_scaler as gs
from optimem.estimators.alloc_tape import TapeSim
from optimem.estimators.estimate import estimate
from optimem.estimators.memsim import veval
from optimem.estimators.phases import simulate

B, S = 2, 32


def _model_and_run(mixed, device="cuda"):
    est = estimate("tiny-gpt2", "adamw_torch", device=device, mixed_precision=mixed, batch_size=B, seq_len=S)
    thunk = est.__dict__.get("_cuda_thunk")
    model = thunk.args[1] if thunk is not None else None
    return est, model


def _total(res, b=B, s=S):
    return veval(res[0], b, s)


def test_fp16_cuda_step_holds_the_scalers_bytes_and_bf16_none():
    est, model = _model_and_run("fp16")
    assert model.amp_scaler and any(n.startswith("fp16 GradScaler (rule") for n in est.notes)
    run = model.run_at(B, S)
    assert run.amp_scaler
    with_, without = simulate(run, None), simulate(replace(run, amp_scaler=False), None)
    # the forward is untouched; backward's peak adds _scale, _growth_tracker and the scaled loss (the peak is
    # where activations are largest, before the inv_scale chain and found_inf at the end)
    assert _total(with_["step0.forward"].end) == _total(without["step0.forward"].end)
    peak = lambda r, ph: r[ph].peak(B, S)[0]  # noqa: E731
    assert peak(with_, "step0.backward") - peak(without, "step0.backward") == \
        gs.SCALE + gs.GROWTH_TRACKER + gs.SCALED_LOSS
    # what the optimizer step starts on: the scaler's two tensors and found_inf (kept until scaler.update)
    assert _total(with_["step0.backward"].end) - _total(without["step0.backward"].end) == \
        gs.SCALE + gs.GROWTH_TRACKER + gs.FOUND_INF
    assert _total(with_["step0.optimizer_step"].end) - _total(without["step0.optimizer_step"].end) == \
        gs.SCALE + gs.GROWTH_TRACKER
    # a steady step starts with them: its forward holds 8 bytes more than step 0's
    for ph in ("steady.forward", "steady.backward"):
        assert peak(with_, ph) - peak(without, ph) == gs.SCALE + gs.GROWTH_TRACKER + (gs.SCALED_LOSS if "back" in ph else 0)
    # the allocator sees, over step 0 and a steady step: _scale and _growth_tracker once, then per step the
    # scaled loss, backward's extra root gradient, double/reciprocal/float of inv_scale and found_inf
    ops = []
    for r in (run, replace(run, amp_scaler=False)):
        sim = TapeSim()
        simulate(r, model.step, sim=sim, both_steps=True)
        ops.append(sum(1 for _, size in sim.ops if size is not None))
    assert ops[0] - ops[1] == 2 + 2 * (2 + len(gs.INV_SCALE) + 1)


def test_bf16_cuda_and_fp16_cpu_have_no_scaler():
    est, model = _model_and_run("bf16")
    assert not model.amp_scaler and not model.run_at(B, S).amp_scaler
    assert not any("GradScaler" in n for n in est.notes)
    cpu = estimate("tiny-gpt2", "adamw_torch", device="cpu", mixed_precision="fp16", batch_size=B, seq_len=S)
    assert not any("GradScaler" in n for n in cpu.notes)
