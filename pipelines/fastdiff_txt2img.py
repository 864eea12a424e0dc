"""diffusers custom pipeline: Stable Diffusion txt2img run by fastdiff's stream core.

    pipe = DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/fastdiff_txt2img.py",
                                             trust_remote_code=True)
    image = pipe("a watercolor fox", num_inference_steps=4).images[0]

Called exactly like StableDiffusionPipeline; `cfg="self"` switches to residual guidance.
"""

from diffusers import StableDiffusionPipeline

import fastdiff


class FastdiffStableDiffusionPipeline(StableDiffusionPipeline):
    def __call__(self, *args, cfg=None, delta=1.0, **kwargs):
        return fastdiff.accelerate(self, cfg=cfg, delta=delta)(*args, **kwargs)
