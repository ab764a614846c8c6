"""The GPU's energy counter and SM clock from NVML (libnvidia-ml, which the driver installs),
read through ctypes: no package needed. Used by tools/energy_parts.py and by
tools/bench_throughput.py --energy."""

from __future__ import annotations

import ctypes

NVML_CLOCK_SM = 1


class Nvml:
    """One GPU's energy counter (mJ since the driver loaded) and SM clock (MHz)."""

    def __init__(self, index: int = 0):
        try:
            self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError as e:
            raise RuntimeError(f"NVML is not available here ({e}): it comes with the NVIDIA "
                               "driver") from None
        if self.lib.nvmlInit_v2() != 0:
            raise RuntimeError("nvmlInit_v2 failed")
        self.handle = ctypes.c_void_p()
        if self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.handle)) != 0:
            raise RuntimeError(f"no NVML handle for GPU {index}")

    def energy_mj(self) -> int:
        v = ctypes.c_ulonglong(0)
        if self.lib.nvmlDeviceGetTotalEnergyConsumption(self.handle, ctypes.byref(v)) != 0:
            raise RuntimeError("nvmlDeviceGetTotalEnergyConsumption failed")
        return v.value

    def sm_mhz(self) -> int:
        v = ctypes.c_uint(0)
        self.lib.nvmlDeviceGetClockInfo(self.handle, NVML_CLOCK_SM, ctypes.byref(v))
        return v.value
