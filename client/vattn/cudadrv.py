"""Loading the CUDA driver through cuda-bindings, shared by the daemon and the client."""
from __future__ import annotations


class CudaUnavailable(RuntimeError):
    """No usable CUDA driver or GPU in this process."""


def import_driver():
    """``cuda.bindings.driver``, not initialised; raises CudaUnavailable where it is not importable."""
    try:
        from cuda.bindings import driver as cu
    except Exception as exc:  # noqa: BLE001 - any import failure means no CUDA here
        raise CudaUnavailable(f"cuda-bindings is not importable ({exc})") from None
    return cu


def load_driver():
    """Imports and initialises the CUDA driver (``cuda.bindings.driver``)."""
    cu = import_driver()
    try:
        (err,) = cu.cuInit(0)
    except Exception as exc:  # noqa: BLE001 - e.g. the driver library is missing
        raise CudaUnavailable(
            f"the CUDA driver library cannot be loaded ({type(exc).__name__}: {exc})"
        ) from None
    if err != cu.CUresult.CUDA_SUCCESS:
        raise CudaUnavailable(f"cuInit failed: {err.name}")
    return cu


def check(cu, result, what: str):
    """Unpacks a cuda-bindings result tuple; raises RuntimeError on an error code."""
    err, *rest = result
    if err != cu.CUresult.CUDA_SUCCESS:
        _, text = cu.cuGetErrorString(err)
        raise RuntimeError(f"{what} failed: {err.name} ({text.decode() if text else ''})")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def gpu_count() -> int:
    """GPUs the driver sees; 0 where there is no driver."""
    try:
        cu = load_driver()
    except CudaUnavailable:
        return 0
    err, count = cu.cuDeviceGetCount()
    return count if err == cu.CUresult.CUDA_SUCCESS else 0
