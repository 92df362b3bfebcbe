"""qi plugin ``example``: a Karras-spaced sigma schedule and a Qwen-Image recipe that samples with it, plus a
guider (CFG with rescale) and a sampler (the midpoint method) any pipeline can use.

    import qi_core as qi
    pipe = qi.compose("qwen-image-example", model="Qwen/Qwen-Image")
    image = pipe(prompt="a lighthouse at dusk", num_inference_steps=20, seed=0)
    image = pipe(prompt="a lighthouse at dusk", guidance="example-rescaled-cfg", sampler="example-midpoint")

Registration must stay cheap (``qi plugins`` calls every hook): register factories as ``"module:attr"``
strings; torch is imported only when a pipeline is composed.
"""

from __future__ import annotations

import qi_core as qi

QI_HOOK_API = 1  # the qi hook API this plugin was written for; qi skips it (and says so) if that changes
QI_REQUIRES = ("qwen_image",)  # plugins whose parts this one uses (its recipe names the base model's parts)
NAME = "example"  # entry-point name; registered names derive from it so renamed copies never collide
SCHEDULER = f"{NAME.replace('_', '-')}-karras"
PIPELINE = f"qwen-image-{NAME.replace('_', '-')}"
GUIDER = f"{NAME.replace('_', '-')}-rescaled-cfg"
SAMPLER = f"{NAME.replace('_', '-')}-midpoint"


@qi.hookimpl
def qi_register_schedulers(register):
    register(SCHEDULER, "qi_plugin_example.schedule:KarrasSchedule")


@qi.hookimpl
def qi_register_guiders(register):
    register(GUIDER, f"{__name__}.loop:RescaledCFG")


@qi.hookimpl
def qi_register_samplers(register):
    register(SAMPLER, f"{__name__}.loop:Midpoint")


@qi.hookimpl
def qi_register_pipelines(register):
    # The base plugin's parts, by their registered names, with this plugin's schedule.
    register(
        qi.Recipe(
            name=PIPELINE,
            description="Qwen-Image sampled on a Karras (rho = 7) sigma spacing",
            components={
                "text_encoder": qi.Component(part="qwen2.5-vl", subfolder="text_encoder"),
                "dit": qi.Component(part="qwen-image-dit", subfolder="transformer", kind="denoiser"),
                "vae": qi.Component(part="qwen-image-vae", subfolder="vae"),
            },
            scheduler=SCHEDULER,
            injectors=("input-image",),
            defaults={"num_inference_steps": 20, "cfg_scale": 4.0, "height": 1328, "width": 1328},
            model="Qwen/Qwen-Image",
            tiny="qi_plugins.qwen_image.tiny:make_tiny_model",  # model="tiny": a random tiny model for tests
        )
    )
