"""`--model` as a checkpoint directory or a Hugging Face hub id ("owner/name[@revision]"), found in the local
Hugging Face cache first and downloaded into it otherwise."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.constants import ENV_VARS_TRUE_VALUES
from huggingface_hub.errors import (GatedRepoError, HFValidationError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import validate_repo_id

from expertflow.errors import ExpertflowError

# What the engine reads (checkpoint.py, loading.py): config, generation defaults, tokenizer, safetensors weights.
# Not *.bin, *.pt, consolidated.safetensors or onnx copies, which many repos hold too and would multiply the download.
HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
             "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja"]

# owner/name, optionally @revision (branch, tag or commit). Bare names ("gpt2") stay directory names: the hub has
# moved its old unowned models under owners, and a mistyped directory should keep its own error.
_HUB_ID = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


def resolve_model(spec: str | Path) -> Path:
    """The checkpoint directory `spec` names: itself when it is a directory (a local directory wins over a hub id
    spelled the same), else the hub id's snapshot in the Hugging Face cache, downloaded there if need be."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    hub_id = _hub_id(str(spec))
    if hub_id is None:
        raise ExpertflowError(f"model directory {path} does not exist; pass --model DIR of a saved checkpoint")
    return _snapshot(str(spec), *hub_id)


def model_name(path: Path) -> str:
    """What a model is called (served model id, trace header): its hub id for a snapshot in the Hugging Face cache,
    whose directory is named for a commit; else its directory's name."""
    repo = path.parent.parent
    if path.parent.name == "snapshots" and repo.name.startswith("models--"):
        return repo.name.removeprefix("models--").replace("--", "/")
    return path.name


def _hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when `spec` is shaped like a hub id, else None."""
    match = _HUB_ID.fullmatch(spec)
    if match is None:
        return None
    try:
        validate_repo_id(match["repo"])  # the hub's own rules: no "--" or "..", no leading or trailing "-" or "."
    except HFValidationError:
        return None
    return match["repo"], match["revision"]


def _snapshot(spec: str, repo_id: str, revision: str | None) -> Path:
    # huggingface_hub reads its environment once, at import; reading it here honours what the process (or a test)
    # set since, and is the same thing for a fresh `expertflow` command.
    fetch = dict(revision=revision, cache_dir=_cache_dir(), allow_patterns=HUB_FILES,
                 endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        cached = Path(snapshot_download(repo_id, local_files_only=True, **fetch))
        if _complete(cached):
            return cached  # no network round trip when the model is already here
    except LocalEntryNotFoundError:
        pass
    download = f"download it with `hf download {repo_id}" + (f" --revision {revision}`" if revision else "`")
    if _offline():
        raise ExpertflowError(f"model {spec!r} is neither a directory nor in the Hugging Face cache "
                              f"{fetch['cache_dir']} (HF_HUB_OFFLINE=1); {download} first or pass --model DIR")
    try:
        return Path(snapshot_download(repo_id, **fetch))
    except GatedRepoError:
        raise ExpertflowError(f"model {spec!r} is gated on the Hugging Face Hub: accept its terms at "
                              f"https://huggingface.co/{repo_id} and log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise ExpertflowError(f"model {spec!r} is neither a directory nor a repo on the Hugging Face Hub (a private "
                              "one needs `hf auth login`); check the spelling or pass --model DIR") from None
    except RevisionNotFoundError:
        raise ExpertflowError(f"model {spec!r}: the Hugging Face Hub has no revision {revision or 'main'!r} of "
                              f"{repo_id}; name a branch, tag or commit it has") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].removeprefix("Got: ")
        raise ExpertflowError(f"cannot fetch model {spec!r} from the Hugging Face Hub ({reason}); check the network, "
                              f"or {download} where there is one, or pass --model DIR") from None


def _cache_dir() -> Path:
    """HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub: huggingface_hub's own order."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(cache)).expanduser()


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ENV_VARS_TRUE_VALUES


def _complete(snapshot: Path) -> bool:
    """Whether the config and every weight file are there: a snapshot that a download of single files, or an
    interrupted one, left behind is fetched again rather than failing later at load time."""
    index = snapshot / "model.safetensors.index.json"
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    except (ValueError, KeyError, TypeError, AttributeError):
        return True  # a broken index is the checkpoint reader's to report, with its own message
    return (snapshot / "config.json").is_file() and all((snapshot / shard).is_file() for shard in shards)
