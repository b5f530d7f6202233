"""The reward models behind `reward.py`, one job per module:

    base         the `Reward` interface, `RewardOutput`, `Secret`, batch helpers, `WeightedSumReward`
    registry     `register_reward` / `register_lazy_reward`, reward plugins, `--reward_model` specs,
                 `add_reward_args`, `validate_reward_args`, `build_reward`
    model_files  finding and reading weights: local files and folders, Hugging Face Hub repos
    clip         clip, hpsv2, pickscore, aesthetic (rewards on CLIP embeddings)
    blip         image_reward and compositional (ImageReward's BLIP architecture)
    mllm         mllm (a multimodal chat model grading with a rubric)
    pixel        brightness, saturation, jpeg_compressibility, jpeg_incompressibility

Importing a reward module registers its rewards; `import reward` imports them all. Nothing is imported here.
"""
