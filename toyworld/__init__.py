"""A toy world for Diffusion-Sharpening at CPU scale: captioned images of coloured shapes (`world`), a
programmatic reward that checks an image against its caption (`reward`), and the script that trains the
small SDXL-architecture model of this world shipped in `models/toy-sdxl` (`train_base`)."""
