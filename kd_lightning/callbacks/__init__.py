"""Lightning callbacks that change a distillation run over time (one concern each)."""

from kd_lightning.callbacks.generation import DistillmOffPolicy, OnPolicyGeneration
from kd_lightning.callbacks.taid import TAIDSchedule
from kd_lightning.callbacks.temperature import CosineTemperature, DynamicTemperature, LinearTemperature
