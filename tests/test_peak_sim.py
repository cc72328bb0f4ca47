"""The memory simulator behind the whole-step estimate: exactness of the candidate pruning, autograd and
checkpointing semantics on hand-made programs, and no leaks in any architecture program."""
import itertools
import random

import pytest

from estimators import ops
from estimators.archs import Setting, arch_from_config
from estimators.catalog import resolve
from estimators.inventory import build_config, build_inventory
from estimators.memsim import CATS, PhaseResult, Sim, basis, vec, veval
from estimators.peak import buffers_bytes
from estimators.phases import Run, simulate


def test_pruning_never_drops_a_peak():
    rng = random.Random(0)
    for _ in range(20):
        cands = []
        for _ in range(300):
            t = tuple(rng.choice((0, 0, rng.randint(0, 10 ** 6))) for _ in range(6))
            cands.append((t, tuple((0,) * 6 for _ in CATS), 0))
        r = PhaseResult(cands, cands[-1])
        assert len(r.tot) <= len(cands)
        for b, s in itertools.product((1, 2, 7, 64), (1, 3, 128, 4096)):
            x = basis(b, s)
            best = max(sum(a * c for a, c in zip(t[0], x)) for t in cands)
            assert r.peak(b, s)[0] == best


def _mlp(sim, x, w1, w2, n_hidden):
    h = ops.linear(sim, x, w1, vec(bs=n_hidden * 4))
    a = ops.unary_saving_input(sim, "silu", h)
    sim.drop(h)
    y = ops.linear(sim, a, w2, vec(bs=4))
    sim.drop(a)
    return y


def test_backward_frees_saved_tensors_and_keeps_gradients():
    sim = Sim()
    sim.phase("forward")
    w1, w2 = sim.param("w1", 8 * 4), sim.param("w2", 8 * 4)
    x = sim.const(vec(bs=4))
    y = _mlp(sim, x, w1, w2, 8)
    loss = sim.op("sum", [y], [vec(4)], rule=ops.rule_alloc_inputs, ctx=[y.size])[0]
    sim.drop(y)
    saved = sim.live[:]
    assert saved == list(vec(4, bs=4 + 8 * 4 + 8 * 4))  # x, h (silu's input), silu's output, the loss
    sim.phase("backward")
    sim.backward(loss)
    sim.drop(loss)
    sim.phase(None)
    grads = sum(p.grad.size[0] for p in sim.params.values())
    assert grads == 2 * 8 * 4
    assert tuple(sim.live) == vec(grads, bs=4)  # only x (held by Python) and the two .grad remain
    assert sim.results["backward"].peak(1, 1)[0] > sim.results["forward"].peak(1, 1)[0] - 4


def test_checkpoint_keeps_only_inputs_and_recomputes():
    def run(gc):
        sim = Sim()
        sim.phase("forward")
        w1, w2 = sim.param("w1", 64 * 4), sim.param("w2", 64 * 4)
        x = sim.leaf(vec(bs=4))
        y = sim.checkpoint(lambda s, xx: _mlp(s, xx, w1, w2, 64), x) if gc else _mlp(sim, x, w1, w2, 64)
        loss = sim.op("sum", [y], [vec(4)], rule=ops.rule_alloc_inputs, ctx=[y.size])[0]
        sim.drop(y)
        fwd_end = veval(tuple(sim.live), 2, 16)
        sim.phase("backward")
        sim.backward(loss)
        sim.drop(loss, x)
        sim.phase(None)
        return fwd_end, sim.results["backward"].peak(2, 16)[0], tuple(sim.live)

    fwd, bwd, end = run(False)
    fwd_gc, bwd_gc, end_gc = run(True)
    assert fwd_gc == fwd - 2 * 2 * 16 * 64 * 4  # the two hidden activations are not kept
    assert bwd_gc == bwd  # ...but recomputed before they are needed
    assert end == end_gc == vec(2 * 64 * 4)  # nothing but the two .grad is left


SETTINGS = [Setting(), Setting(gc=True), Setting(es=2), Setting(autocast=2, gc=True), Setting(attn="eager"),
            Setting(attn="eager", gc=True, es=2), Setting(device="cuda"), Setting(device="cuda", gc=True, autocast=2)]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2", "tiny-t5"])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"es{s.es}-ac{s.autocast}-{s.attn}-gc{int(s.gc)}-{s.device}")
@pytest.mark.parametrize("accum", [1, 2])
def test_programs_leave_nothing_behind(model, setting, accum):
    """After a step's ``zero_grad`` only the model, the loss accumulator and the fetched batches (this step's
    and the prefetched one: three (B, S) int64 tensors each) are alive."""
    arch = arch_from_config(build_config(resolve(model)))
    inv = build_inventory(model).with_dtype("bf16" if setting.es == 2 else "fp32")
    run = Run(arch, setting, inv.weight_bytes, buffers_bytes(arch, setting.es), accum)
    res = simulate(run)
    expected = vec(inv.weight_bytes + buffers_bytes(arch, setting.es) + run.other_bytes, bs=3 * 8 * (accum + 1))
    assert res["step0.optimizer_step"].end[0] == expected
    assert res["forward_end"].end[0][3] > 0
