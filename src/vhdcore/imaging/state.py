"""The job state of an imaging job: where it lives, how it is written
(atomically, durably) and read back, and the job's identity (a job resumes
only the state of the very same chain, target and options)."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from .. import _io
from ..chain import Chain
from ..vhd.file import PathLike
from ..errors import JobStateError

__all__ = ["STREAM_FORMAT", "STATE_VERSION", "job_state_path"]

#: identifies the layout of the image stream (a change makes old states invalid)
STREAM_FORMAT = "vhd-dynamic-ascending/1"
#: the plan lists the stored blocks (a number, or ``[number, ...]`` as
#: states of earlier releases wrote it); a segment record may carry the xxh3
#: of its uncompressed frames (checked when a resumed job adopts the segment)
STATE_VERSION = 1


def plan_blocks(plan: list[Any]) -> list[int]:
    """The block numbers of a job state's plan."""
    return [int(p[0]) if isinstance(p, list) else int(p) for p in plan]


def _state_home() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                             "state")
    return os.path.join(base, "vhdcore", "jobs")


def job_state_path(target_url: str, state_dir: PathLike | None = None) -> str:
    """Where the state of a job imaging to ``target_url`` lives: beside the
    output for a ``file://`` target, else in ``state_dir`` (default
    ``$XDG_STATE_HOME/vhdcore/jobs``)."""
    from urllib.parse import unquote, urlparse

    tag = hashlib.sha256(target_url.encode()).hexdigest()[:12]
    parsed = urlparse(target_url)
    if state_dir is None and parsed.scheme in ("file", ""):
        path = unquote(parsed.path) if parsed.scheme == "file" else target_url
        return os.path.join(os.path.dirname(os.path.abspath(path)),
                            os.path.basename(path) + ".vhdcore-job.json")
    d = os.fspath(state_dir) if state_dir is not None else _state_home()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in target_url)[-80:]
    return os.path.join(d, f"{safe}-{tag}.vhdcore-job.json")


def _chain_identity(chain: Chain) -> list[dict[str, Any]]:
    out = []
    for ly in chain.layers:
        st = os.fstat(ly._fd)
        out.append({"path": os.path.realpath(ly.path), "uuid": str(ly.uuid),
                    "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _job_id(identity: list[dict[str, Any]], target: str, options: dict[str, Any]) -> str:
    blob = json.dumps({"chain": identity, "target": target, "options": options,
                       "format": STREAM_FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _save_state(path: str, state: dict[str, Any]) -> None:
    _io.make_dirs(os.path.dirname(path))
    _io.atomic_write(path, json.dumps(state).encode(), private=True)


def _remove_state(path: str) -> None:
    """Remove the job state for good (a finished or discarded job)."""
    os.unlink(path)
    _io.fsync_dir(os.path.dirname(path))


def _load_state(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise JobStateError(f"{path}: unreadable job state ({exc}); remove it or run with "
                            "--restart") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise JobStateError(f"{path}: not a vhdcore job state of version {STATE_VERSION}")
    return state


