"""The hooked capture's building blocks against PyTorch's own definitions."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from traintrace.features.hooks import unfold_patches


@pytest.mark.parametrize(
    ("kernel", "dilation", "stride"),
    list(itertools.product([(3, 3), (2, 5), (1, 1)], [(1, 1), (2, 1)], [(1, 1), (2, 3)])),
)
def test_unfold_patches_equal_f_unfold_with_and_without_the_bias_row(kernel, dilation, stride):
    x = torch.randn(3, 4, 13, 11, dtype=torch.float64)
    ref = F.unfold(x, kernel, dilation=dilation, stride=stride)
    assert torch.equal(unfold_patches(x, kernel, dilation, stride), ref)
    with_bias = unfold_patches(x, kernel, dilation, stride, bias=True)
    assert torch.equal(with_bias[:, :-1], ref)
    assert torch.equal(with_bias[:, -1], torch.ones_like(with_bias[:, -1]))
