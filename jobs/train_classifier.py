"""``patchscaler train-classifier``: train the texture classifier: cross-entropy on DTD latent patches.

Options: ``jobs/train.py``; the loop: ``trainer/loop.py``.
"""

from __future__ import annotations

import argparse

from jobs import train

TASK = "classifier"


def add_arguments(p: argparse.ArgumentParser) -> None:
    train.add_arguments(p, TASK)


def run(args: argparse.Namespace) -> int:
    return train.run_task(args, TASK)
