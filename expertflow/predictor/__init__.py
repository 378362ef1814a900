"""The Routing Path Predictor (paper section 3.2): model, training, evaluation and baselines."""

from expertflow.predictor.model import PredictorConfig, RoutingPathModel
from expertflow.predictor.runtime import RoutingPredictor

__all__ = ["PredictorConfig", "RoutingPathModel", "RoutingPredictor"]
