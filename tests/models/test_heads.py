"""The Swin PEFT decoders (fastdense.models.heads) against MTLoRA's released decoder."""
import pytest
import torch
import torch.nn.functional as F

from fastdense.models.heads import DECODER_CHANNELS, Downsampler, HRNetHead, TaskDecoder

# Swin-T's decoder inputs in MTLoRA: stages 0-2 after the next patch merging, stage 3 as is.
SWIN_T_FEATURES = (192, 384, 768, 768)
PASCAL_OUTPUTS = {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_decoder_parameter_counts_match_mtlora():
    # Per task: Downsampler 192*18 + 384*36 + 768*72 + 768*144 = 183,168; head conv 270 -> 1080 with
    # bias 292,680; BatchNorm(1080) 2,160; conv 1080 -> C_t with bias 1,081 C_t.
    for task, c in PASCAL_OUTPUTS.items():
        dec = TaskDecoder(SWIN_T_FEATURES, c)
        assert n_params(dec.downsampler) == 183_168
        assert n_params(dec.head) == 292_680 + 2_160 + 1_081 * c, task
    total = sum(n_params(TaskDecoder(SWIN_T_FEATURES, c)) for c in PASCAL_OUTPUTS.values())
    assert total == 1_946_624  # docs/papers.md: decoders 1.947 M for the four PASCAL tasks


def test_layer_composition():
    dec = TaskDecoder(SWIN_T_FEATURES, 5)
    assert [tuple(p.weight.shape) for p in dec.downsampler.proj] == [
        (c, c_in, 1, 1) for c_in, c in zip(SWIN_T_FEATURES, DECODER_CHANNELS)]
    assert all(p.bias is None for p in dec.downsampler.proj)
    conv1, bn, relu, conv2 = dec.head.last_layer
    assert tuple(conv1.weight.shape) == (1080, 270, 1, 1) and conv1.bias is not None
    assert bn.num_features == 1080 and bn.momentum == 0.1
    assert isinstance(relu, torch.nn.ReLU)
    assert tuple(conv2.weight.shape) == (5, 1080, 1, 1) and conv2.bias is not None
    # The state-dict names the checkpoint converter maps MTLoRA's keys onto.
    assert sorted(dec.state_dict()) == sorted(
        [f"downsampler.proj.{k}.weight" for k in range(4)]
        + [f"head.last_layer.0.{n}" for n in ("weight", "bias")]
        + [f"head.last_layer.1.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
        + [f"head.last_layer.3.{n}" for n in ("weight", "bias")])


def test_forward_equals_the_released_computation():
    torch.manual_seed(0)
    dims, chans = (8, 12, 16, 16), (3, 4, 5, 6)
    dec = TaskDecoder(dims, 2, channels=chans).eval()
    with torch.no_grad():
        bn = dec.head.last_layer[1]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    sizes = [(8, 8), (4, 4), (2, 2), (2, 2)]
    feats = [torch.randn(2, c, *s) for c, s in zip(dims, sizes)]
    out = dec(feats, (32, 32))

    # MTLoRA: Downsampler 1x1 convs, HighResolutionHead (bilinear to level 0, concat, conv-BN-ReLU-conv),
    # then DecoderGroup's bilinear resize to the image size.
    down = [F.conv2d(f, p.weight) for f, p in zip(feats, dec.downsampler.proj)]
    h, w = down[0].shape[-2:]
    x = torch.cat([down[0]] + [F.interpolate(d, (h, w), mode="bilinear") for d in down[1:]], 1)
    c1, bn, _, c2 = dec.head.last_layer
    x = F.conv2d(x, c1.weight, c1.bias)
    x = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    x = F.relu(x * bn.weight[:, None, None] + bn.bias[:, None, None])
    want = F.interpolate(F.conv2d(x, c2.weight, c2.bias), (32, 32), mode="bilinear")
    assert out.shape == (2, 2, 32, 32)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_fewer_stages_and_errors():
    dec = TaskDecoder((8, 16), 3)  # two stages: the first two decoder widths
    assert [p.out_channels for p in dec.downsampler.proj] == [18, 36]
    out = dec([torch.randn(1, 8, 4, 4), torch.randn(1, 16, 2, 2)], (16, 16))
    assert out.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="expected 2 stage features"):
        dec([torch.randn(1, 8, 4, 4)], (16, 16))
    with pytest.raises(ValueError, match="decoder channels"):
        Downsampler((8, 16, 32), (4, 4))
    assert isinstance(HRNetHead((4, 4), 1).last_layer[2], torch.nn.ReLU)
