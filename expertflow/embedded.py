"""The embedded default model shipped inside the package: tiny-mixtral-32e (see its README), and the routing
path predictor trained on its traces (tiny-mixtral-32e-rpp, see its README), so that policy `expertflow`
runs on the embedded model without training a predictor first."""

from pathlib import Path

EMBEDDED_MODEL_NAME = "tiny-mixtral-32e"
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "models" / EMBEDDED_MODEL_NAME
EMBEDDED_PREDICTOR_DIR = EMBEDDED_MODEL_DIR.parent / f"{EMBEDDED_MODEL_NAME}-rpp"
