"""The VGGT checkpoint: resolved once by the driver, before Ray starts, so a wrong or unreachable
`--model` is said in seconds, and a hub download happens once, with its progress bar, not once
per worker inside Ray.

    --model facebook/VGGT-1B        -> the hub's cache (downloaded here if missing) -> a local file
    --model /models/vggt            -> /models/vggt/model.safetensors (or model.pt, pytorch_model.bin)
    --model /models/vggt/model.pt   -> that file, checked to hold VGGT's weights

Checks read only a checkpoint's header (safetensors) or its pickled index (torch.load with mmap):
seconds, even for the 5 GB file. Errors are `CheckpointError` with a one-line message that names
`--model`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

FILE_NAMES = ("model.safetensors", "model.pt", "pytorch_model.bin")  # looked for in a folder
HUB_FILE_NAMES = FILE_NAMES[:2]  # looked for in a hub repo (facebook/VGGT-1B holds model.pt)
# Every VGGT checkpoint has these parts; the point and track heads are optional (not built here).
REQUIRED_PREFIXES = ("aggregator.", "camera_head.", "depth_head.")
HUB_CONNECT_TIMEOUT = 5.0  # seconds: an unreachable hub is said at once, not after minutes of retries


class CheckpointError(Exception):
    """`--model` cannot be used: the message is one line and names --model."""


@dataclass(frozen=True)
class Resolved:
    source: str  # --model as given
    path: str | None  # local checkpoint file (absolute); None when not resolved (dry run: not cached)
    note: str  # one line for the user: where the checkpoint comes from


def looks_like_path(source: str) -> bool:
    """A local path rather than a hub id ("owner/name"): it exists, or is spelled like a path."""
    return (os.path.exists(source) or source.startswith((".", "/", "~"))
            or source.endswith((".pt", ".pth", ".bin", ".safetensors")) or source.count("/") != 1)


def resolve(source: str, download: bool = True) -> Resolved:
    """--model -> a checked local checkpoint file. A hub id is taken from the local cache, or
    downloaded now (`download`, with huggingface_hub's progress bar); with download=False (dry
    run) a missing hub file is reported, not fetched."""
    if looks_like_path(source):
        path = local_file(source)
        check_state_dict(path, source)
        return Resolved(source, path, f"model: {path}")
    cached = hub_cached_file(source)
    if cached is not None:
        check_state_dict(cached, source)
        return Resolved(source, cached, f"model: {source} (cached at {cached})")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise CheckpointError(f"argument --model: {source} is not in the local cache and HF_HUB_OFFLINE is set; "
                              f"pass a local checkpoint file or folder")
    reason = hub_unreachable_reason()
    if reason is not None:
        raise CheckpointError(f"argument --model: {source} is not in the local cache and the hub cannot be "
                              f"reached ({reason}); download the checkpoint elsewhere and pass its file or folder")
    if not download:
        return Resolved(source, None, f"model: {source} is not cached; a run downloads it first (about 5 GB)")
    path = hub_download(source)
    check_state_dict(path, source)
    return Resolved(source, path, f"model: {source} (downloaded to {path})")


def local_file(source: str) -> str:
    path = os.path.abspath(os.path.expanduser(source))
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in FILE_NAMES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise CheckpointError(f"argument --model: folder {source} holds none of {', '.join(FILE_NAMES)}")
    raise CheckpointError(f"argument --model: no such file or folder: {source} "
                          f"(a hub id is spelled owner/name, e.g. facebook/VGGT-1B)")


def state_dict_keys(path: str) -> list[str]:
    """The tensor names of a checkpoint, without reading its tensors."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a state dict")
    return [str(k) for k in state]


def check_state_dict(path: str, source: str) -> None:
    """The file loads as a state dict with VGGT's parts, or CheckpointError."""
    try:
        keys = state_dict_keys(path)
    except Exception as e:  # a truncated download, a pickle that is not a state dict, a random file
        raise CheckpointError(f"argument --model: {path} is not a readable checkpoint: {_one_line(e)}") from e
    missing = [p for p in REQUIRED_PREFIXES if not any(k.startswith(p) for k in keys)]
    if missing:
        raise CheckpointError(f"argument --model: {source} does not hold VGGT weights: no {', '.join(m + '*' for m in missing)} "
                              f"keys among its {len(keys)} (e.g. {', '.join(keys[:3]) or 'none'})")


def hub_cached_file(repo_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for name in HUB_FILE_NAMES:
        try:
            found = try_to_load_from_cache(repo_id, name)
        except Exception:  # an id the hub library rejects: reported by the download step
            return None
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def hub_unreachable_reason() -> str | None:
    """None when a TCP connection to the hub's endpoint opens within HUB_CONNECT_TIMEOUT, else why
    not (huggingface_hub would retry for minutes before saying so)."""
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=HUB_CONNECT_TIMEOUT):
            return None
    except OSError as e:
        return _one_line(e)


def hub_download(repo_id: str) -> str:
    """Download the checkpoint into the hub cache (huggingface_hub's own progress bar)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for name in HUB_FILE_NAMES:
        try:
            return hf_hub_download(repo_id, name)
        except EntryNotFoundError:
            continue  # this name is not in the repo: try the next
        except Exception as e:  # no such repo, gated, network
            raise CheckpointError(f"argument --model: {repo_id} cannot be downloaded: {_one_line(e)}") from e
    raise CheckpointError(f"argument --model: the hub repo {repo_id} holds none of {', '.join(HUB_FILE_NAMES)}")


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]
