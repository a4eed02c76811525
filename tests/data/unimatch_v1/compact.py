"""Writes this folder's compact copy of the UniMatch V1 golden data (README.md here says what it keeps).

    python tests/data/unimatch_v1/compact.py /path/to/reference/unimatch_v1

Checks the originals' sha256 first, so the copy is always of the files the README names.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ORIGINALS = {
    "deeplabv3plus_keys.json": "b80f88e883a6db5468c1aabaa9aa7d8f754ad29e4364944f323fe56a17ffd82d",
    "forward.pt": "0f73d21cd581177fe6ac1fce2f9bacbcdc292140eeed0ef5eb36bcf364b71efa",
    "step.pt": "d21618c184b3eb3a50635e96f9fd3653089e44453e11943681150184f81a8bd9",
}
PROVENANCE = ("format", "reference_commit", "torch_version", "threads", "dtype", "input_decode")
FORWARD = PROVENANCE + (
    "recipe_keys_r50", "recipe_checksums_r50", "odd_x_u8", "even_x_u8", "fp_seed", "fp_mask_c1", "fp_mask_c4",
    *(f"{case}_{what}" for case in ("odd", "even")
      for what in ("out_shape", "out_rows", "out_cols", "out_sub", "out_sum", "out_sumsq", "c1_shape", "c4_shape")),
    "odd_c1_sum", "odd_c4_sum",
    *(f"fp_outfp_{what}" for what in ("shape", "rows", "cols", "sub", "sum", "sumsq")),
)
STEP_DROPPED = ("reference_blob_ids", "conf_u_w", "conf_u_w_mix", "mask_u_w", "mask_u_w_mix", "params_before")


def main(source: Path) -> None:
    for name, digest in ORIGINALS.items():
        actual = hashlib.sha256((source / name).read_bytes()).hexdigest()
        if actual != digest:
            raise SystemExit(f"{source / name}: sha256 {actual}, expected {digest}")
    keys = json.loads((source / "deeplabv3plus_keys.json").read_text())
    compact = {depth: {"state_dict": model["state_dict"], "param_count": model["param_count"]}
               for depth, model in keys["models"].items()}
    (HERE / "keys.json").write_text(json.dumps({"reference": keys["reference"], "models": compact}) + "\n")
    forward = torch.load(source / "forward.pt", weights_only=True)
    torch.save({k: forward[k] for k in FORWARD}, HERE / "forward.pt")
    step = torch.load(source / "step.pt", weights_only=True)
    torch.save({k: v for k, v in step.items() if k not in STEP_DROPPED}, HERE / "step.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
