"""The processor's settings as one frozen record (pevideo/processor_settings.py), and the Normalization
record going as it is to the model's patchify op, normalized by the one uint8 function."""
import pytest
import torch

from pevideo.processing import PeVideoVideoProcessor
from pevideo_kernels import patchify_normalize_ref


@pytest.mark.parametrize("options", [{}, {"do_normalize": False}, {"do_rescale": False},
                                     {"image_mean": [0.4, 0.45, 0.5], "image_std": [0.2, 0.25, 0.3], "rescale_factor": 1 / 127}],
                         ids=["pe", "rescale-only", "normalize-only", "custom"])
def test_model_patchify_takes_the_processors_record_bit_for_bit(options, seed):
    """The Normalization record goes as it is to Ops.patchify, and one function normalizes uint8 for the
    processor and the model: the model's uint8 entry sees exactly the processor's values (a rescale-only
    processor used to reach the kernel as (x - 0) / (1/r), 1 ulp off x·r in half the levels)."""
    from pevideo.dispatch import Ops

    proc = PeVideoVideoProcessor(size={"height": 28, "width": 28}, **options)
    u8 = torch.randint(0, 256, (3, 28, 28, 3), dtype=torch.uint8)
    pv = proc(u8.numpy(), do_sample_frames=False, return_tensors="pt")["pixel_values_videos"][0]
    got = Ops(fast=False).patchify("patchify", u8, 14, proc.normalization)
    assert torch.equal(got, patchify_normalize_ref(pv, 14))


def test_settings_are_resolved_once(monkeypatch, seed):
    """The processor's settings are one frozen record, made when the processor is and again only when a
    setting is assigned or a call overrides one; properties and plain calls read it."""
    import dataclasses

    from pevideo.processor_settings import ProcessorSettings

    proc = PeVideoVideoProcessor(size={"height": 24, "width": 24})
    made = []
    real = ProcessorSettings.resolve.__func__
    monkeypatch.setattr(ProcessorSettings, "resolve", classmethod(lambda cls, get: made.append(1) or real(cls, get)))
    x = torch.randint(0, 256, (4, 30, 40, 3), dtype=torch.uint8).numpy()
    for _ in range(3):
        proc.normalization, proc.output_size, proc.frame_plan, proc.resize_frames(x)
        proc(x, num_frames=2, return_tensors="pt")
    assert made == [] and proc.settings is proc.settings
    assert proc(x, size=16, return_tensors="pt")["pixel_values_videos"].shape[-1] == 16 and len(made) == 1
    proc.size = {"height": 20, "width": 12}
    assert proc.output_size == (20, 12) and proc.frame_plan.size == (20, 12) and len(made) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        proc.settings.normalizes = False
