"""The trackers on their own: exact tensor accounting, phase folding, RSS, throughput, and the CUDA / NVML
trackers (those skip cleanly without CUDA)."""
from __future__ import annotations

import time

import pytest
import torch

from optimem.harness.trackers.phases import PhaseRecorder
from optimem.harness.trackers.rss import RssTracker
from optimem.harness.trackers.tensor_accounting import CATEGORIES, TensorAccountant
from optimem.estimators.gpus import device_peak_flops as peak_flops
from optimem.estimators.throughput import flops_per_token
from optimem.harness.trackers.throughput import ThroughputTracker, summarize

KB = 4096  # bytes of 1024 fp32 elements


def test_accountant_is_exact_per_category_and_at_the_peak():
    param = torch.nn.Parameter(torch.zeros(1024))
    state: dict = {}
    acct = TensorAccountant("cpu", classifier=lambda: {"parameters": [param], "optimizer_state": list(state.values())})
    with acct:
        acct.start_phase("step0.forward")
        act = torch.ones(2048)              # alive at the end: activation (8 KiB)
        tmp = torch.ones(4096)              # freed inside the phase: temporary (16 KiB)
        del tmp
        tmp2 = torch.ones(1024)             # 4 KiB, born after the peak (which had tmp alive)
        fwd = acct.end_phase()
        assert fwd.peak_bytes == 8 * 1024 + 16 * 1024
        assert fwd.breakdown_at_peak["activations"] == 8 * 1024
        assert fwd.breakdown_at_peak["temporaries"] == 16 * 1024
        assert fwd.breakdown_at_peak["parameters"] == 0
        # the parameter was created before tracking: the classifier adopts it at the phase end
        assert fwd.end_bytes == 8 * 1024 + 4 * 1024 + KB
        assert fwd.breakdown_at_end["activations"] == 12 * 1024
        assert fwd.breakdown_at_end["parameters"] == KB

        acct.start_phase("step0.optimizer_step")
        state["exp_avg"] = torch.zeros(1024)   # becomes optimizer state once the classifier names it
        scratch = torch.empty(512)
        del scratch, act, tmp2
        opt = acct.end_phase()
        assert opt.breakdown_at_end["optimizer_state"] == KB
        assert opt.breakdown_at_peak["optimizer_state"] == KB       # settled after the fact, exact at the peak
        assert opt.breakdown_at_peak["temporaries"] == 2048
        assert opt.breakdown_at_peak["parameters"] == KB
        assert opt.breakdown_at_end["activations"] == 0
    assert set(opt.breakdown_at_peak) == set(CATEGORIES)


def test_accountant_gradients_views_and_inplace():
    lin = torch.nn.Linear(64, 32, bias=False)
    acct = TensorAccountant("cpu", classifier=lambda: {"parameters": list(lin.parameters()),
                                                       "gradients": [lin.weight.grad]})
    lin.weight.register_post_accumulate_grad_hook(acct.mark_gradient)
    x = torch.randn(8, 64)
    with acct:
        acct.start_phase("step0.forward")
        y = lin(x)
        y.view(-1).add_(1)  # a view and an in-place op allocate nothing
        loss = y.sum()
        acct.end_phase()
        acct.start_phase("step0.backward")
        loss.backward()
        bwd = acct.end_phase()
    assert bwd.breakdown_at_end["gradients"] == 64 * 32 * 4
    assert acct.category_peaks["gradients"] == 64 * 32 * 4
    assert bwd.breakdown_at_end["parameters"] == 64 * 32 * 4


def test_accountant_pause_and_stop_leave_the_dispatch_stack():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    acct = TensorAccountant("cpu")
    with acct:
        acct.start_phase("p")
        assert _get_current_dispatch_mode() is acct
        acct.pause()
        assert _get_current_dispatch_mode() is None
        unseen = torch.ones(256)
        acct.resume()
        seen = torch.ones(256)
        acct.stop()
        assert _get_current_dispatch_mode() is None
        also_unseen = torch.ones(256)
        res = acct.end_phase()
    assert res.peak_bytes == 1024
    assert unseen.numel() + also_unseen.numel() + seen.numel() == 768


def test_accountant_sees_inside_tensor_subclasses_and_torch_tensor():
    from torchao.optim.subclass_8bit import OptimState8bit

    acct = TensorAccountant("cpu")
    with acct:
        acct.start_phase("p")
        st = OptimState8bit.zeros((4096,), signed=True, block_size=256)
        from_data = torch.tensor([1.0, 2.0, 3.0, 4.0])
        res = acct.end_phase()
    # codes (1 B each) + one fp32 scale per 256 + the 256-entry fp32 qmap (built with torch.tensor), + 16 B
    assert res.end_bytes == 4096 + 16 * 4 + 256 * 4 + 16
    del st, from_data


class _Fake:
    def __init__(self, values):
        self.values = iter(values)

    def start_phase(self, name):
        pass

    def end_phase(self):
        peak, end = next(self.values)
        return {"peak_bytes": peak, "end_bytes": end, "alloc_retries": 1}


def test_recorder_folds_steady_steps_and_keeps_order():
    fake = _Fake([(10, 10), (20, 15),                 # model_load, setup
                  (50, 40), (60, 30), (45, 20),       # step 0: forward, backward, optimizer_step
                  (70, 60), (80, 70), (65, 55),       # step 1
                  (75, 65), (81, 71), (66, 56),       # step 2
                  (0, 0)])                            # the dangling forward of step 3
    rec = PhaseRecorder({"t": fake}, primary="t")
    rec.switch("model_load")
    rec.switch("setup")
    for step in range(3):
        rec.switch("forward", step)
        rec.current.forward_seen = True
        rec.switch("backward", step)
        rec.switch("optimizer_step", step)
    rec.switch("forward", 3)  # the loop ended: no forward ran in it, so it is dropped
    rec.end()
    phases = rec.phases()
    assert list(phases) == ["model_load", "setup", "step0.forward", "step0.backward", "step0.optimizer_step",
                            "steady.forward", "steady.backward", "steady.optimizer_step"]
    assert phases["step0.forward"]["peak_bytes"] == 50
    assert phases["steady.forward"] == {"peak_bytes": 75, "end_bytes": 65, "occurrences": 2,
                                        "t": {"peak_bytes": 75, "end_bytes": 65, "alloc_retries": 2}}
    assert phases["steady.backward"]["peak_bytes"] == 81
    assert phases["steady.optimizer_step"]["end_bytes"] == 56


def test_rss_tracker_sees_a_big_allocation():
    rss = RssTracker()
    rss.start()
    rss.start_phase("p")
    block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
    del block
    res = rss.end_phase()
    rss.stop()
    assert res["peak_bytes"] >= res["end_bytes"] > 0
    assert res["peak_bytes"] - rss.baseline_bytes >= 48 * 1024 * 1024
    assert rss.method in ("hwm", "sampled")


def test_throughput_excludes_warmup():
    tp = ThroughputTracker(samples_per_step=4, tokens_per_step=256, warmup=1)
    tp.train_begin()
    for _ in range(3):
        tp.pre_optimizer_step()
        time.sleep(0.002)
        tp.post_optimizer_step()
        tp.step_end()
    s = tp.summary(flops_per_step=1e9, peak=1e12)
    assert s["measured_steps"] == 2 and len(s["all_step_times_s"]) == 3
    total = sum(s["all_step_times_s"][1:])
    assert s["samples_per_s"] == pytest.approx(8 / total)
    assert s["tokens_per_s"] == pytest.approx(512 / total)
    assert s["optimizer_step_time_s"]["p50"] >= 0.002
    assert s["mfu"] == pytest.approx(2e9 / total / 1e12)
    assert summarize([1.0, 2.0, 3.0, 4.0])["p90"] == pytest.approx(3.7)
    assert summarize([]) is None


def test_peak_flops_table():
    """The harness's MFU peak comes from the one GPU catalog, by device name."""
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "tf32") == 156e12
    assert peak_flops("Tesla V100-SXM2-16GB", "bf16") is None
    assert peak_flops("Some Future GPU", "bf16") is None
    assert flops_per_token(1000, 2, 64, 128) == 6000 + 12 * 2 * 64 * 128


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_cuda_allocator_tracker_per_phase():
    from optimem.harness.trackers.cuda import CudaAllocatorTracker

    tr = CudaAllocatorTracker(0)
    tr.start_phase("a")
    x = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    del x
    a = tr.end_phase()
    tr.start_phase("b")
    y = torch.empty(16 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    b = tr.end_phase()
    assert a["peak_bytes"] >= 256 * 1024 * 1024 > b["peak_bytes"] >= 16 * 1024 * 1024
    assert a["reserved_peak_bytes"] >= a["peak_bytes"] and a["active_peak_bytes"] >= 256 * 1024 * 1024
    assert b["end_bytes"] >= 16 * 1024 * 1024 and a["alloc_retries"] == 0
    del y


@pytest.mark.gpu
@needs_cuda
def test_nvml_sampler_sees_the_context_and_a_peak():
    from optimem.harness.trackers.nvml import NvmlSampler, nvml_available

    if not nvml_available():
        pytest.skip("NVML not available")
    s = NvmlSampler(0, interval_s=0.005)
    s.start()
    s.start_phase("p")
    x = torch.empty(512 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    time.sleep(0.05)
    res = s.end_phase()
    s.stop()
    assert res["peak_used_bytes"] >= s.baseline_bytes + 512 * 1024 * 1024
    assert s.samples > 0
    del x


@pytest.mark.gpu
@needs_cuda
def test_cuda_run_end_to_end():
    from optimem.harness.launcher import execute
    from optimem.harness.record import validate
    from optimem.harness.scenario import RunConfig

    record = execute(RunConfig(optim="adamw_torch", device="cuda", steps=3, warmup=1), timeout_s=600)
    validate(record)
    assert record["status"] == "ok", record["reason"]
    m = record["measured"]
    assert m["primary_tracker"] == "cuda"
    assert m["peaks"]["max_memory_allocated"] > 0 and m["peaks"]["max_memory_reserved"] >= \
        m["peaks"]["max_memory_allocated"]
    for name in ("step0.forward", "steady.forward", "step0.optimizer_step"):
        assert m["phases"][name]["cuda"]["peak_bytes"] > 0
    assert m["phases"]["steady.forward"]["peak_bytes"] > m["phases"]["step0.forward"]["peak_bytes"]
    assert m["optimizer_state_bytes"] == record["predicted"]["bytes"]["optimizer_state"]
    if "nvml" in m["peaks"]:
        assert m["peaks"]["nvml"]["cuda_context_bytes"] > 0
    assert m["throughput"]["mfu"] is None or 0 < m["throughput"]["mfu"] < 1


def test_nvml_sampler_logic_with_a_fake_driver(monkeypatch):
    """The sampler's baseline / context / per-phase peak arithmetic, on any machine (a stand-in NVML)."""
    import pynvml

    from optimem.harness.trackers import nvml as nv

    used = {"v": 1000}

    class Info:
        def __init__(self):
            self.used, self.total, self.reserved = used["v"], 80_000, 7

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: ("handle", i))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda h, version=None: Info())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    s = nv.NvmlSampler(0, interval_s=0.001)
    assert s.baseline_bytes == 1000
    used["v"] = 1500
    assert s.record_context(allocator_reserved_bytes=100) == 400
    s.start()
    s.start_phase("p")
    used["v"] = 9000
    time.sleep(0.05)
    used["v"] = 2000
    res = s.end_phase()
    s.stop()
    assert res == {"peak_used_bytes": 9000, "end_used_bytes": 2000}
    totals = s.totals()
    assert totals["baseline_bytes"] == 1000 and totals["cuda_context_bytes"] == 400
    assert totals["peak_used_bytes"] == 9000 and totals["peak_above_baseline_bytes"] == 8000 and totals["samples"] > 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert nv.visible_device_handle(1) == ("handle", 1) and nv.visible_device_handle(0) == ("handle", 3)


def test_cuda_tracker_logic_with_a_fake_allocator(monkeypatch):
    """Per-phase deltas and run totals of the allocator tracker, on any machine (stand-in torch.cuda calls)."""
    from optimem.harness.trackers import cuda as cu

    stats = {"num_alloc_retries": 2, "num_ooms": 0, "active_bytes.all.peak": 0}
    alloc = {"max": 0, "cur": 0}
    monkeypatch.setattr(cu.torch.cuda, "memory_stats", lambda device=None: dict(stats))
    monkeypatch.setattr(cu.torch.cuda, "reset_peak_memory_stats", lambda device=None: alloc.update(max=alloc["cur"]))
    monkeypatch.setattr(cu.torch.cuda, "max_memory_allocated", lambda device=None: alloc["max"])
    monkeypatch.setattr(cu.torch.cuda, "max_memory_reserved", lambda device=None: alloc["max"] + 512)
    monkeypatch.setattr(cu.torch.cuda, "memory_allocated", lambda device=None: alloc["cur"])
    monkeypatch.setattr(cu.torch.cuda, "memory_reserved", lambda device=None: alloc["cur"] + 512)
    tr = cu.CudaAllocatorTracker(0)
    tr.start_phase("a")
    alloc.update(max=5000, cur=1000)
    stats.update({"num_alloc_retries": 5, "active_bytes.all.peak": 5000})
    a = tr.end_phase()
    assert a == {"peak_bytes": 5000, "reserved_peak_bytes": 5512, "active_peak_bytes": 5000, "end_bytes": 1000,
                 "reserved_end_bytes": 1512, "alloc_retries": 3, "ooms": 0}
    tr.start_phase("b")
    assert alloc["max"] == 1000
    b = tr.end_phase()
    assert b["peak_bytes"] == 1000 and b["alloc_retries"] == 0
    assert tr.totals()["max_memory_allocated"] == 5000 and tr.totals()["alloc_retries"] == 5
