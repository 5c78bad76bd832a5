"""``patchscaler train-grm``: train the Global Restoration Module, Eq. (1)/(8), on Real-ESRGAN-degraded LR.

Options: ``jobs/train.py``; the loop: ``trainer/loop.py``.
"""

from __future__ import annotations

import argparse

from jobs import train

TASK = "grm"


def add_arguments(p: argparse.ArgumentParser) -> None:
    train.add_arguments(p, TASK)


def run(args: argparse.Namespace) -> int:
    return train.run_task(args, TASK)
