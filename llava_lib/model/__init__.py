"""The model: vision tower, projection, the merged LLaVA model, loading and checkpoints."""
from .llava import LlavaStage1, StepOutput, lean_causal_lm_loss
from .projector import PROJECTOR_TYPES, build_projector
from .vision import VisionTower

__all__ = ["LlavaStage1", "StepOutput", "lean_causal_lm_loss", "PROJECTOR_TYPES", "build_projector", "VisionTower"]
