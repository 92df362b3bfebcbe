"""The loss curve and throughput: one record per optimizer step in ``logs/train_log.csv`` and
``logs/train_log.jsonl`` (and TensorBoard when it is installed). A resumed run first drops the records after
the step it resumes from, so the curve has no duplicates."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

FIELDS = ("step", "epoch", "loss", "lr", "samples", "step_time_s", "samples_per_s")


class MetricsLog:
    def __init__(self, output_path: str | Path, *, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.dir = Path(output_path) / "logs"
        self.csv_path, self.jsonl_path = self.dir / "train_log.csv", self.dir / "train_log.jsonl"
        self.tb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_step)
        new = not self.csv_path.exists()
        self.csv_file = self.csv_path.open("a", newline="", encoding="utf-8")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=FIELDS, lineterminator="\n")
        if new:
            self.csv.writeheader()
        self.jsonl = self.jsonl_path.open("a", encoding="utf-8")
        try:  # optional: TensorBoard when the tensorboard package is installed
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
        except ImportError:
            self.tb = None

    def _truncate(self, step: int) -> None:
        if self.jsonl_path.exists():
            keep = [
                ln for ln in self.jsonl_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step
            ]
            self.jsonl_path.write_text("".join(ln + "\n" for ln in keep))
        if self.csv_path.exists():
            with self.csv_path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
            with self.csv_path.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
                w.writeheader()
                w.writerows(rows)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.csv.writerow({k: record.get(k) for k in FIELDS})
        self.csv_file.flush()
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k in ("loss", "lr", "samples_per_s"):
                self.tb.add_scalar(f"train/{k}", record[k], record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.csv_file.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def read_log(output_path: str | Path) -> list[dict[str, Any]]:
    """The JSONL records of a run (for tests and plots)."""
    path = Path(output_path) / "logs" / "train_log.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln] if path.exists() else []
