"""When the daemon may size its GPU pools from NVML (and start the CUDA driver after it listens)."""
from __future__ import annotations

import ctypes

import pytest

from vattnd.backends.nvml import quick_gpus, usable

H200 = ("NVIDIA H200", 150754820096, False)


def test_identical_gpus_without_cuda_visible_devices_or_mig_are_usable():
    assert usable([H200] * 4, {})
    assert usable([H200], {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"})  # one model: any order sizes the same


@pytest.mark.parametrize("gpus, environ", [
    ([], {}),  # no GPU: the driver decides (auto then serves host memory)
    ([H200] * 2, {"CUDA_VISIBLE_DEVICES": "1"}),  # CUDA sees a subset, renumbered
    ([H200] * 2, {"CUDA_VISIBLE_DEVICES": ""}),  # CUDA sees none
    ([H200, ("NVIDIA H200", 150754820096, True)], {}),  # MIG: CUDA lists instances, not GPUs
    ([H200, ("NVIDIA H100 80GB HBM3", 85520809984, False)], {}),  # mixed models: CUDA may order them otherwise
    ([H200, ("NVIDIA H200", 150000000000, False)], {}),
])
def test_nvml_is_not_trusted_where_cuda_may_number_or_size_gpus_otherwise(gpus, environ):
    assert not usable(gpus, environ)


def test_quick_gpus_defers_to_the_driver_where_it_cannot_know():
    assert quick_gpus({"CUDA_VISIBLE_DEVICES": "0"}) is None
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        assert quick_gpus({}) is None  # no NVML here: the CUDA backend asks the driver at start
    else:
        gpus = quick_gpus({})
        assert gpus is None or [g.index for g in gpus] == list(range(len(gpus)))


def test_a_cuda_backend_sized_from_nvml_reports_its_drivers_first_failure_and_closes():
    """The CUDA backend built from NVML's GPUs starts the driver on first use. Where the driver cannot start
    (no GPU here), every later call raises the same error (the driver is started once) and close() is safe."""
    from vattn.cudadrv import CudaUnavailable, gpu_count, import_driver
    from vattnd.backends.base import BackendUnavailable, DeviceInfo
    from vattnd.backends.cuda import CudaBackend

    try:
        import_driver()
    except CudaUnavailable:
        pytest.skip("cuda-bindings is not importable here")
    if gpu_count():
        pytest.skip("a GPU is usable here: the driver starts (tests/gpu covers that)")
    known = [DeviceInfo(0, "NVIDIA H200", 150754820096)]
    with pytest.raises(BackendUnavailable, match="multiple of 2 MiB"):
        CudaBackend(3 << 20, known=known)
    with pytest.raises(BackendUnavailable, match="do not exist"):
        CudaBackend(2 << 20, [1], known=known)
    backend = CudaBackend(2 << 20, known=known)
    assert [d.name for d in backend.devices()] == ["NVIDIA H200"]  # no driver needed for that
    with pytest.raises(BackendUnavailable) as first:
        backend.create_pages(0, 4)
    with pytest.raises(BackendUnavailable) as again:
        backend.export_pages(0, [])
    assert again.value is first.value
    backend.close()


def test_start_early_hands_nvml_s_answer_to_one_backend_and_starts_nothing_for_host_memory(monkeypatch):
    """`vattnd start` asks NVML and starts cuInit first (vattnd.backends.start_early); the next open_backend takes
    NVML's answer, once. Here (no GPU) the driver cannot start: auto still serves host memory."""
    import vattnd.backends as backends
    from vattn.cudadrv import gpu_count
    from vattnd.backends import cuda

    if gpu_count() or quick_gpus() is not None:
        pytest.skip("NVML or the driver sees a GPU here: tests/gpu starts daemons through start_early")
    monkeypatch.setattr(backends, "_early_gpus", backends._UNASKED)  # this process's start-up state, restored after
    monkeypatch.setattr(cuda, "_early", None)
    backends.start_early("host")
    assert backends._early_gpus is backends._UNASKED and cuda._early is None  # host memory: nothing started
    backends.start_early("auto")
    assert backends._early_gpus is None  # no NVML here
    assert cuda._early is not None
    backend = backends.open_backend("auto", 2 << 20)
    try:
        assert backend.kind == "host"
        assert backends._early_gpus is backends._UNASKED  # used once
        assert not cuda._early.thread.is_alive()  # the backend waited for it before asking the driver
    finally:
        backend.close()
