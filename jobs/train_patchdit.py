"""``patchscaler train-patchdit``: train Patch-DiT and the texture encoder, Eq. (9),
with an RTM and the frozen GRM and classifier.

Options: ``jobs/train.py``; the loop: ``trainer/loop.py``.
"""

from __future__ import annotations

import argparse

from jobs import train

TASK = "patchdit"


def add_arguments(p: argparse.ArgumentParser) -> None:
    train.add_arguments(p, TASK)


def run(args: argparse.Namespace) -> int:
    return train.run_task(args, TASK)
