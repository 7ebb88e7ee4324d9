"""Read W&B offline runs (``wandb/offline-run-*/run-*.wandb``) without W&B's servers or an account.

An offline run keeps everything it logged in one transaction log, written in LevelDB's log format: 32 KiB
blocks of checksummed chunks, each chunk a whole protobuf ``Record`` or a first/middle/last piece of one. This
module decodes those records with W&B's own protobuf classes and sums a run up as its config, its metric
history, its summary and its exit code: what ``experiments/collect_sweep.py`` needs to list a job whose
``summary.json`` did not come back from the cluster.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7  # the file starts with ":W&B" + 2-byte magic + 1-byte version; every chunk with crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[Any]:
    """The records of a ``.wandb`` transaction log, in order.

    A chunk the writer is still appending (a run that is still going, or was killed mid-write) ends the read:
    only the complete records before it are returned.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    pos, pieces, records = HEADER, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # too little room for a chunk header: the rest of the block is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding up to the block end
            pos += left
            continue
        if pos + HEADER + length > len(data):
            break
        chunk, pos = data[pos + HEADER : pos + HEADER + length], pos + HEADER + length
        pieces = chunk if kind in (FULL, FIRST) else pieces + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pieces)
            records.append(record)
    return records


def _key(item: Any) -> str:
    # Lightning logs "val/pearson" as a nested key ["val/pearson"]; plain keys use .key.
    return "/".join(item.nested_key) if item.nested_key else item.key


@dataclass
class OfflineRun:
    """What one W&B offline run logged.

    Attributes:
        path: The run's directory (``.../wandb/offline-run-<time>-<id>``).
        config: The logged config (the app logs its whole resolved config).
        history: One dict per logged step.
        summary: The run summary (the last value of each metric, and what the app put there at fit end).
        exit_code: The code the run finished with; ``None`` when it never finished (killed, or still running).
    """

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None

    def best(self, metric: str, mode: str = "max") -> float | None:
        """The best value ``metric`` took over the history (``mode`` ``"max"`` or ``"min"``)."""
        values = [h[metric] for h in self.history if isinstance(h.get(metric), (int, float))]
        if not values:
            return None
        return max(values) if mode == "max" else min(values)


def read_run(run_dir: str | Path) -> OfflineRun:
    """Decode the offline run in ``run_dir`` (the folder holding ``run-<id>.wandb``).

    Raises:
        FileNotFoundError: ``run_dir`` holds no ``run-*.wandb`` file.
    """
    run_dir = Path(run_dir)
    logs = sorted(run_dir.glob("run-*.wandb"))
    if not logs:
        raise FileNotFoundError(f"no run-*.wandb in {str(run_dir)!r}; is it a W&B offline run directory?")
    run = OfflineRun(path=run_dir)
    for record in read_records(logs[0]):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):  # the config given to wandb.init comes with the run record
            items = (record.run if kind == "run" else record).config.update
            run.config.update({_key(u): json.loads(u.value_json) for u in items if u.key != "_wandb"})
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary.update({_key(u): json.loads(u.value_json) for u in record.summary.update})
        elif kind == "exit":
            run.exit_code = int(record.exit.exit_code)
    return run


def find_runs(folder: str | Path) -> list[Path]:
    """Every W&B offline run directory below ``folder``."""
    return sorted(p.parent for p in Path(folder).rglob("offline-run-*/run-*.wandb"))
