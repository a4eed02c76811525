"""Writes this folder's files from the golden reference folder (README.md here says what is kept).

    python tests/data/unimatch_v2/subset.py /path/to/reference/unimatch_v2

Not run by the tests; kept so the subset can be re-made and checked against the originals.
"""

import hashlib
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
D_TOKEN_STEP = 4  # case (d): every 4th token of the 1369


def main(source: str) -> None:
    src = Path(source)
    shutil.copyfile(src / "dinov2_keys.json", HERE / "dinov2_keys.json")

    dpt = torch.load(src / "dpt_tiny.pt", weights_only=True)
    # The inputs are uniform noise that torch.randint(0, 256, shape, dtype=uint8) draws from
    # Generator().manual_seed(777) in the order a, b, c (the test regenerates them): only their
    # sha256 is kept, so a torch whose generator drew differently fails by name.
    generator = torch.Generator().manual_seed(dpt["seeds"]["inputs"])
    keep = {k: v for k, v in dpt.items() if k not in ("a_x_u8", "b_x_u8", "c_x_u8", "d_features")}
    for case in "abc":
        x = dpt[f"{case}_x_u8"]
        assert torch.equal(x, torch.randint(0, 256, tuple(x.shape), generator=generator, dtype=torch.uint8))
        keep[f"{case}_x_shape"] = list(x.shape)
        keep[f"{case}_x_sha256"] = hashlib.sha256(x.numpy().tobytes()).hexdigest()
    # Case (d): every D_TOKEN_STEP-th token of each of the four layers.
    tokens = torch.arange(0, dpt["d_features"][0].shape[1], D_TOKEN_STEP)
    keep["d_tokens"] = tokens
    keep["d_features"] = [f[:, tokens].clone() for f in dpt["d_features"]]
    keep["subset_note"] = (f"inputs left out (regenerated from the seed, checked by sha256); case (d) tokens "
                           f"0::{D_TOKEN_STEP} (d_tokens); everything else as in dpt_tiny.pt")
    torch.save(keep, HERE / "dpt_tiny_subset.pt")

    step = torch.load(src / "step_tiny.pt", weights_only=True)
    assert all(torch.equal(step["ema_init"][k], v) for k, v in step["student_init"].items())
    keep = {k: v for k, v in step.items() if k not in ("conf_u_w", "ema_init")}
    keep["subset_note"] = "conf_u_w and ema_init (equal to student_init) left out; everything else as in step_tiny.pt"
    torch.save(keep, HERE / "step_tiny_subset.pt")


if __name__ == "__main__":
    main(sys.argv[1])
