"""The embedded default model shipped inside the package: tiny-mixtral-32e (see its README), and the routing
path predictor trained on its traces (tiny-mixtral-32e-rpp, see its README), so that policy `expertflow`
runs on the embedded model, and on copies `expertflow widen` made of it, without training a predictor first."""

from pathlib import Path

from expertflow.lineage import routes_as

EMBEDDED_MODEL_NAME = "tiny-mixtral-32e"
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "models" / EMBEDDED_MODEL_NAME
EMBEDDED_PREDICTOR_DIR = EMBEDDED_MODEL_DIR.parent / f"{EMBEDDED_MODEL_NAME}-rpp"


def shipped_predictor_for(model: Path) -> Path | None:
    """The shipped RPP where `model` routes as the embedded model does (it, or a widened copy of it), else None."""
    return EMBEDDED_PREDICTOR_DIR if routes_as(model, EMBEDDED_MODEL_DIR) else None
