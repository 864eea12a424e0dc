"""diffusers custom pipeline: Stable Diffusion img2img run by fastdiff's stream core.

    pipe = DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/fastdiff_img2img.py",
                                             trust_remote_code=True)
    image = pipe("a watercolor fox", image=frame, strength=0.5).images[0]

Called exactly like StableDiffusionImg2ImgPipeline; `cfg="self"` switches to residual guidance.
"""

from diffusers import StableDiffusionImg2ImgPipeline

import fastdiff


class FastdiffStableDiffusionImg2ImgPipeline(StableDiffusionImg2ImgPipeline):
    def __call__(self, *args, cfg=None, delta=1.0, **kwargs):
        return fastdiff.accelerate(self, cfg=cfg, delta=delta)(*args, **kwargs)
