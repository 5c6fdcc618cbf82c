"""The layout benchmark's variants: the temporal-conv rewrite computes the same convolution, variant names are
checked, and the script runs its eager variants on the tiny networks (the GPU runs are in RESULTS.md)."""
import argparse
import json

import pytest
import torch
from torch import nn

from hyportrait.benchmarks import layout_gpu
from hyportrait.benchmarks.layout_gpu import TemporalConvAs2d, temporal_convs_as_2d, variant_options


def test_a_temporal_conv_as_2d_is_the_same_convolution():
    torch.manual_seed(0)
    conv = nn.Conv3d(4, 6, kernel_size=(3, 1, 1), padding=(1, 0, 0))
    x = torch.randn(2, 4, 5, 3, 7)
    model = nn.Sequential(conv, nn.Conv3d(6, 6, kernel_size=3, padding=1))
    expected = model(x)
    temporal_convs_as_2d(model)
    assert isinstance(model[0], TemporalConvAs2d) and model[0].conv is conv
    assert isinstance(model[1], nn.Conv3d)  # a 3x3x3 kernel is left alone
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_variant_names_are_checked():
    assert variant_options("eager") == set()
    assert variant_options("compiled+forced_layout_opt") == {"compiled", "forced_layout_opt"}
    with pytest.raises(argparse.ArgumentTypeError, match="fastest"):
        variant_options("compiled+fastest")


def test_the_layout_script_times_and_profiles_its_variants(tmp_path):
    report_path = tmp_path / "layout.json"
    layout_gpu.main(["--size", "tiny", "--networks", "vae_decoder", "--report", str(report_path),
                     "--variants", "eager", "temporal_conv2d", "cudnn_benchmark", "--profile", "eager", "temporal_conv2d"])
    entry = json.loads(report_path.read_text())["networks"]["vae_decoder"]
    for variant in ("eager", "temporal_conv2d", "cudnn_benchmark"):
        assert entry[variant]["ms"] > 0
        assert entry[variant]["relative_error_vs_first_variant"] < 1e-4
    # the decoder's temporal convolutions all have (3, 1, 1) kernels: rewritten, no 3-D convolution is left
    assert "aten::conv3d" in entry["top_kernels_eager"]
    assert "aten::conv3d" not in entry["top_kernels_temporal_conv2d"]
    assert not torch.backends.cudnn.benchmark  # the variant's switch is put back
