#!/usr/bin/env python
"""SFT Diffusion-Sharpening for any supported model family: SDXL, SD3 / SD3.5 or FLUX.1 (flow matching),
detected from the checkpoint's model_index.json. The algorithm and its flags are those of
train_sft_diffusion_sharpening_sdxl.py (that name is kept for the seed's commands); only the model family differs.

    accelerate launch train_sft_diffusion_sharpening.py --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium ...
"""
import sys

import train_sft_diffusion_sharpening_sdxl as algorithm

DESCRIPTION = (__doc__ + "\nThe algorithm, as written for SDXL (SD3 and FLUX.1 take flow-matching Euler steps on their sigma grid "
               "where SDXL takes DDIM steps):\n\n" + algorithm.__doc__.split("\n", 2)[2])

if __name__ == "__main__":
    algorithm.main(algorithm.parse_args(sys.argv[1:], DESCRIPTION))
