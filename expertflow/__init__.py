"""expertflow: Mixture-of-Experts inference with experts outside fast memory (ExpertFlow)."""

from expertflow.api import ExpertflowModel, from_pretrained
from expertflow.config import EngineConfig
from expertflow.errors import ExpertflowError

__all__ = ["EngineConfig", "ExpertflowError", "ExpertflowModel", "from_pretrained"]
__version__ = "0.1.0"
