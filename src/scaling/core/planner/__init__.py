"""Know before you launch: pure functions that predict per-rank memory, the pipeline bubble, communication
volume and step time of a layout, and the device table they (and the MFU metric) measure against."""

from scaling.core.planner.bubble import PipelineTimeline, pipeline_timeline
from scaling.core.planner.communication import CommunicationVolume, link_of, step_communication
from scaling.core.planner.devices import DEVICES, DeviceSpec, device_spec, measure_local_device, spec_for_local_device
from scaling.core.planner.roofline import StepTimePrediction, predict_step_time

__all__ = [
    "DEVICES",
    "CommunicationVolume",
    "DeviceSpec",
    "PipelineTimeline",
    "StepTimePrediction",
    "device_spec",
    "link_of",
    "measure_local_device",
    "pipeline_timeline",
    "predict_step_time",
    "spec_for_local_device",
    "step_communication",
]
