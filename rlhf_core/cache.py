"""Where a stage's result is cached, and whether a cached result may be served.

Every stage the course builds (demonstrations, SFT, preference pairs, reward model, PPO, DPO, the
critic-free policies, and the pipeline's measurements) is cached the same way:

- **One identity.** A stage's folder is ``cache_dir()/<profile>/<stage>-<key>``, where ``key`` hashes
  the stage's whole config *and* the digests of its inputs (the upstream stages' results: the SFT
  weights a reward model was trained from, the preference pairs it read, ...), and the precision when
  one other than ``auto`` is asked for (``RLHF_PRECISION``). A result is reused
  only when both are the same; change either, and the key, hence the folder, changes, so the stage is
  rebuilt, and two configurations never share a folder.
- **One completion mark.** A folder is finished when its manifest ``stage.json`` exists. It is
  written last, atomically, and lists each output file with its size and SHA-256. An unfinished
  folder may hold a training checkpoint that the next run resumes from.
- **Never serve a damaged result.** Before a finished folder is used, every listed file is checked
  against its recorded size, and safetensors files against their own header (a file cut short by a
  full disk is caught). A damaged folder is reported in one line and rebuilt.
- **Digests flow downstream.** A stage's digest hashes its output files; the stages built on it put
  that digest into their own key. Retrain the reward model, and PPO's key changes with it.
- **One writer.** Under ``accelerate launch`` the main process alone decides whether a stage is
  finished (every process gets its answer) and writes; the others wait for it (``rlhf_core.distributed``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

from . import distributed
from .config import Profile, cache_dir

FORMAT = 3  # version of the cache layout; bump it when what a stage stores changes (3: RL stages keep summary.json)
MANIFEST = "stage.json"


def stable_hash(data, length: int = 12) -> str:
    """A short SHA-256 of JSON-able data (dataclasses become dicts; keys sorted)."""
    if is_dataclass(data):
        data = asdict(data)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:length]


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, remembered per (path, size, mtime) so a run hashes each file once."""
    path = Path(path)
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        _FILE_DIGESTS[memo] = digest.hexdigest()
    return _FILE_DIGESTS[memo]


def safetensors_problem(path: str | Path) -> str | None:
    """Why a safetensors file cannot be read (None when its header and length are consistent).

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's byte
    range, then the data: a file cut short ends before the last range does."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        return f"{path.name} is {size} bytes long, shorter than its own header"
    with open(path, "rb") as file:
        (header_length,) = struct.unpack("<Q", file.read(8))
        if 8 + header_length > size:
            return f"{path.name} is cut short ({size} bytes; its header alone claims {header_length})"
        try:
            header = json.loads(file.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{path.name} has an unreadable header"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + header_length + max(ends, default=0)
    if size != expected:
        return f"{path.name} is {size} bytes long where its header promises {expected}"
    return None


def weights_identity(folder: str | Path) -> str:
    """The digest of a model folder's weights (a shipped or pretrained base model), checked first."""
    weights = Path(folder) / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"no model.safetensors in {folder}")
    problem = safetensors_problem(weights)
    if problem:
        raise DamagedCacheError(f"{folder}: {problem}")
    return file_digest(weights)[:16]


class DamagedCacheError(RuntimeError):
    """A file the course relies on is damaged; the message names it."""


@dataclass(frozen=True)
class StageEntry:
    """One cached result of one stage: its folder and what identifies it."""

    stage: str  # "sft", "reward_model", "ppo", ...
    folder: Path  # cache_dir()/<profile>/<stage>-<key>
    key: str  # hash of config and inputs: the folder's name ends with it
    config: dict  # the stage's config, as stored in the manifest
    inputs: dict  # upstream digests (and any other input identity) the key was made from

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    def manifest(self) -> dict:
        """The finished manifest (raises when the stage is not finished)."""
        return json.loads(self.manifest_path.read_text())

    @property
    def digest(self) -> str:
        """What the stages built on this one put into their own key."""
        return self.manifest()["digest"]


def stage_entry(profile: Profile, stage: str, config, inputs: dict | None = None, label: str = "") -> StageEntry:
    """The entry for ``stage`` built with ``config`` from ``inputs``: its folder exists or not.
    ``label`` (e.g. ``beta0.1``) only makes folder names readable; the key alone decides."""
    config_dict = asdict(config) if is_dataclass(config) else dict(config or {})
    inputs = dict(inputs or {})
    precision = (os.environ.get("RLHF_PRECISION") or "auto").strip().lower()
    if precision != "auto":  # a model trained in bf16 is another result than the fp32 one (``rlhf_core.precision``)
        inputs["precision"] = precision
    key = stable_hash({"stage": stage, "format": FORMAT, "config": config_dict, "inputs": inputs})
    name = f"{stage}-{label}-{key}" if label else f"{stage}-{key}"
    return StageEntry(stage, cache_dir() / profile.name / name, key, config_dict, inputs)


def entry_problem(entry: StageEntry) -> str | None:
    """Why a finished entry cannot be served (None when every listed file is intact)."""
    try:
        manifest = entry.manifest()
    except (OSError, json.JSONDecodeError):
        return f"its manifest {MANIFEST} is unreadable"
    if manifest.get("key") != entry.key:
        return "its manifest belongs to another configuration"
    for name, recorded in manifest.get("files", {}).items():
        path = entry.folder / name
        if not path.exists():
            return f"{name} is missing"
        if path.stat().st_size != recorded["bytes"]:
            return f"{name} is {path.stat().st_size} bytes long, not the {recorded['bytes']} it was written with"
        if name.endswith(".safetensors"):
            problem = safetensors_problem(path)
            if problem:
                return problem
    return None


def is_finished(entry: StageEntry, announce: Callable[[str], None] = print) -> bool:
    """True when the entry holds an intact finished result. A damaged one is removed after one line
    saying so, and False is returned: the caller rebuilds it. Several processes: the main one checks
    (and removes), and every process gets its answer: they build a stage together or not at all."""
    return distributed.on_main(lambda: _is_finished(entry, announce))


def _is_finished(entry: StageEntry, announce: Callable[[str], None]) -> bool:
    if not entry.manifest_path.exists():
        return False
    problem = entry_problem(entry)
    if problem is None:
        return True
    announce(f"cache: the {entry.stage} stage in {entry.folder} is damaged ({problem}): rebuilding it")
    shutil.rmtree(entry.folder, ignore_errors=True)
    return False


def remove(entry: StageEntry) -> bool:
    """Delete the entry's folder (finished or not); True when there was one (the main process deletes)."""
    return distributed.on_main(lambda: _remove(entry))


def _remove(entry: StageEntry) -> bool:
    if entry.folder.exists():
        shutil.rmtree(entry.folder)
        return True
    return False


def finish(entry: StageEntry, files: Sequence[str], details: dict | None = None) -> dict:
    """Mark the entry finished: hash the listed output files, write the manifest last and
    atomically. Returns the manifest. Several processes: the main one writes it, and every process
    returns it once it is there."""
    if not distributed.is_main_process():
        distributed.wait_for_everyone()
        return entry.manifest()
    records = {}
    for name in sorted(files):
        path = entry.folder / name
        records[name] = {"bytes": path.stat().st_size, "sha256": file_digest(path)}
    manifest = {
        "stage": entry.stage,
        "key": entry.key,
        "format": FORMAT,
        "config": entry.config,
        "inputs": entry.inputs,
        "files": records,
        "digest": stable_hash({name: record["sha256"] for name, record in records.items()}, 16),
        **(details or {}),
    }
    write_json_atomically(entry.manifest_path, manifest)
    distributed.wait_for_everyone()
    return manifest


def write_json_atomically(path: Path, data) -> None:
    """Write JSON to ``path`` through a temporary file: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(data, indent=1))
    partial.replace(path)


def cached_json(path: Path, key: str, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """``compute()``'s result, stored in ``path`` under ``key``: returned as ``(result, cached)``.
    A file with another key, or one that cannot be read, is recomputed. Several processes: the main
    one reads the file and shares what it found; each computes, the main one writes."""
    stored = distributed.on_main(lambda: _stored_result(path, key))
    if stored is not None:
        return stored, True
    result = compute()
    if distributed.is_main_process():
        write_json_atomically(path, {"key": key, "result": result})
    distributed.wait_for_everyone()
    return result, False


def _stored_result(path: Path, key: str):
    """The result stored in ``path`` under ``key``; None when there is none (or it cannot be read)."""
    if path.exists():
        try:
            stored = json.loads(path.read_text())
            if stored.get("key") == key:
                return stored["result"]
        except (OSError, json.JSONDecodeError, KeyError):
            pass
    return None
