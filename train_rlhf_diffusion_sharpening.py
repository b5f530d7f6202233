#!/usr/bin/env python
"""RLHF Diffusion-Sharpening for any supported model family: SDXL, or SD3 / SD3.5 (flow matching), detected from the
checkpoint's model_index.json. The algorithm and its flags are train_rlhf_diffusion_sharpening_sdxl.py's (that name
is kept for the seed's commands); only the model family differs.

    accelerate launch train_rlhf_diffusion_sharpening.py --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium ...
"""
import sys

from train_rlhf_diffusion_sharpening_sdxl import main, parse_args

if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
