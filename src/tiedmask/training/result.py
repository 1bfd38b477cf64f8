"""`Result`: what a finished run reports (its result.json, a results-store record's numbers).

A leaf module: the run files' schema (run_schema.py) reads its field names, and both tasks
(train.py, lm.py) fill it in, without importing each other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class Result:
    status: str  # ok | diverged (with `reason`)
    test_acc: float
    best_test_acc: float
    final_train_loss: float
    params: int
    macs_dense: int
    macs_effective: int
    train_time_s: float
    img_per_s: float
    epochs: int
    seed: int
    config_hash: str
    reason: str = ""
    s_per_epoch: float = 0.0
    trainable_params: int = 0
    peak_mem_mb: float = 0.0
    hardware: str = ""  # the CPU or GPU the run trained on (timings compare only within one)
    precision: str = ""  # what `precision` resolved to on that machine: bf16 | fp32 ("" before 0.3)
    precision_why: str = ""  # "set", or what `auto` found there (the measured bf16 speedup)
    compile_choice: str = ""  # what the training steps ran: eager | compiled ("" in runs from before it was recorded)
    compile_why: str = ""  # "set", or what `compile: auto`'s trial measured
    warning: str = ""  # e.g. a run that ended at chance accuracy
    eval_split: str = "test"  # "val": test_acc is measured on images held out of training (data.val_split)
    # task lm: test_acc is next-token accuracy; losses are mean nats per token over a whole split
    task: str = "image"
    test_loss: float = 0.0
    test_ppl: float = 0.0
    val_ppl: float = 0.0
    tokens_per_s: float = 0.0
    # passes over the training data (images trained on / the epoch's images): fractional where a
    # time budget stopped the last epoch part-way; s_per_epoch is train_time_s per pass
    data_epochs: float = 0.0
    solver: dict = dataclasses.field(default_factory=dict)  # DEQ: mean iterations, residuals

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
