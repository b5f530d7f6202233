#!/usr/bin/env python
"""The name the paper's README commands launch (`accelerate launch train_rlhf_diffusion_sharpen_sdxl.py ...`), so that
they find the script: train_rlhf_diffusion_sharpening_sdxl.py, with the same flags."""
import sys

from train_rlhf_diffusion_sharpening_sdxl import main, parse_args

if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
