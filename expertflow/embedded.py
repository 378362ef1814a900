"""The embedded default model shipped inside the package: tiny-mixtral-32e (see its README)."""

from pathlib import Path

EMBEDDED_MODEL_NAME = "tiny-mixtral-32e"
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "models" / EMBEDDED_MODEL_NAME
