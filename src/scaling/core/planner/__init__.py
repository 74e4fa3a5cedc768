"""Know before you launch: pure functions that predict per-rank memory, the pipeline bubble, communication
volume and step time of a layout, and the device table they (and the MFU metric) measure against."""

from scaling.core.planner.devices import DEVICES, DeviceSpec, device_spec, measure_local_device, spec_for_local_device

__all__ = ["DEVICES", "DeviceSpec", "device_spec", "measure_local_device", "spec_for_local_device"]
