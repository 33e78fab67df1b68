"""
Full-rank training: the baseline every low-rank method is measured against.

Nothing is wrapped and nothing happens between steps; train.py's defaults do all the work
(AdamW over every parameter, warmup + cosine schedule). This file exists so that `--method full`
goes through exactly the same seam as the low-rank methods (see train.py, "The method seam").

    python train.py --method full
"""

from dataclasses import dataclass


@dataclass
class Config:
    pass  # full-rank training has no method flags
