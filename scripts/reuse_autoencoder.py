"""Start a demo retraining from an already trained autoencoder: ``--init``'s model (random GRM,
classifier, Patch-DiT) with the autoencoder of ``--source`` (weights and config, ``scaling_factor``
included), written to ``--out`` as the ``ae`` stage of ``scripts/train_demo.sh``.

    python scripts/reuse_autoencoder.py --init runs/demo/init --source assets/demo/weights --out runs/demo/ae

The autoencoder is trained on clean HR crops only: a change to the degradation range (issue #16) leaves it
as it is, so a retraining of the GRM and Patch-DiT may skip its 30 minutes. ``--out``/reused.json records
where it came from; ``scripts/demo_card.py`` then keeps the autoencoder's row of the existing card and
marks it as reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from safetensors.torch import load_file

from patchscaler.weights import content_hash, load_checkpoint, load_config, save_checkpoint

REUSED_FILE = "reused.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", required=True, help="a checkpoint from `patchscaler init-weights`")
    p.add_argument("--source", required=True, help="a checkpoint whose autoencoder is kept")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    # only the autoencoder of --source is read: its other modules may be of an older architecture
    init, source_config = load_checkpoint(args.init), load_config(args.source)
    state = load_file(str(Path(args.source) / "model.safetensors"))
    prefix = "autoencoder."
    ae_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    def shape(config):  # the autoencoder's architecture: its config but the latent scale
        return dataclasses.replace(config.autoencoder, scaling_factor=0.0)

    if shape(init.config) != shape(source_config):
        raise SystemExit(f"{args.source}'s autoencoder is not the architecture of {args.init}")
    init.autoencoder.load_state_dict(ae_state, strict=True)
    init.config = init.config.replace(autoencoder=source_config.autoencoder)
    version = save_checkpoint(init, args.out)
    source_version = content_hash((Path(args.source) / "model.safetensors").read_bytes())
    record = {"source": args.source, "source_version": source_version, "version": version}
    (Path(args.out) / REUSED_FILE).write_text(json.dumps(record, indent=1))
    print(f"{args.out}: autoencoder of {args.source} (version {source_version}), the rest from {args.init}")


if __name__ == "__main__":
    main()
