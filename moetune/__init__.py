"""moetune: speculative decoding that pays off for Mixture-of-Experts models."""
from pathlib import Path

__version__ = "0.1.0"

MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_TARGET = MODELS_DIR / "target"
DEFAULT_DRAFT = MODELS_DIR / "draft"
