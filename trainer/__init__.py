"""Ray Train jobs for the four PatchScaler trainers: data reading (``data``), tasks (``tasks``) and the
``TorchTrainer`` loop (``loop``). The per-step maths is in ``patchscaler.training``."""
