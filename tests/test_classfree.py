"""Classifier-free guidance and the class embedding (method.classfree, nets.unet): closed forms."""

import pytest
import torch

from wsigen.method.classfree import NO_CLASS, ClassGuided, combine, evaluations
from wsigen.method.edm import EDMPrecond
from wsigen.nets import UNet, UNetConfig


def _pair(seed=0):
    """A class-conditional UNet (3 classes) and a class-free one with the same other weights."""
    torch.manual_seed(seed)
    cond = EDMPrecond(UNet(UNetConfig(width=8, mults=(1, 2), classes=3))).eval()
    free = EDMPrecond(UNet(UNetConfig(width=8, mults=(1, 2)))).eval()
    for p in cond.parameters():  # untrained zero layers would hide every effect
        if not p.detach().any():
            torch.nn.init.normal_(p, std=0.05)
    free.load_state_dict({k: v for k, v in cond.state_dict().items() if "class_emb" not in k}, strict=True)
    return cond, free


def _inputs(b=4):
    g = torch.Generator().manual_seed(3)
    return torch.randn(b, 3, 16, 16, generator=g), torch.tensor([1.7]), torch.tensor([2.0])


class Counting(torch.nn.Module):
    """Records each forward call's batch size and output."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x, sigma, mpp, labels=None):
        out = self.inner(x, sigma, mpp, labels)
        self.calls.append((x.shape[0], None if labels is None else labels.tolist(), out.clone()))
        return out


@torch.no_grad()
def test_no_class_call_is_the_class_free_network():
    cond, free = _pair()
    x, s, m = _inputs()
    ref = free(x, s, m)
    assert torch.equal(cond(x, s, m), ref)
    assert torch.equal(cond(x, s, m, torch.full((4,), NO_CLASS)), ref)
    # mixed batches: the no-class rows agree with the class-free call (to float rounding of a
    # different batch), the class rows differ, and each class differs from the others
    mixed = cond(x, s, m, torch.tensor([NO_CLASS, 0, 1, 2]))
    assert torch.allclose(mixed[0], ref[0], atol=1e-6)
    for j in (1, 2, 3):
        assert (mixed[j] - ref[j]).abs().max() > 1e-4
    c0 = cond(x, s, m, torch.zeros(4, dtype=torch.long))
    c1 = cond(x, s, m, torch.ones(4, dtype=torch.long))
    assert (c0 - c1).abs().max() > 1e-4


@torch.no_grad()
def test_labels_refused_out_of_range_or_on_a_class_free_network():
    cond, free = _pair()
    x, s, m = _inputs()
    with pytest.raises(ValueError, match="class labels"):
        cond(x, s, m, torch.full((4,), 3))
    with pytest.raises(ValueError, match="class-free"):
        free(x, s, m, torch.zeros(4, dtype=torch.long))
    assert torch.equal(free(x, s, m, torch.full((4,), NO_CLASS)), free(x, s, m))


@torch.no_grad()
@pytest.mark.parametrize("w", [0.0, 1.0])
def test_w_0_and_1_are_one_evaluation(w):
    cond, _ = _pair()
    x, s, m = _inputs()
    net = Counting(cond)
    out = ClassGuided(net, 2, w)(x, s, m)
    assert len(net.calls) == 1 and net.calls[0][0] == 4 and evaluations(w) == 1
    label = 2 if w == 1 else NO_CLASS
    assert net.calls[0][1] == [label] * 4
    assert torch.equal(out, cond(x, s, m, torch.full((4,), label)))


@torch.no_grad()
@pytest.mark.parametrize("w", [3.0, 0.5])
def test_other_w_is_one_batched_call_combined_exactly(w):
    cond, _ = _pair()
    x, s, m = _inputs()
    net = Counting(cond)
    out = ClassGuided(net, 1, w)(x, s, m)
    assert len(net.calls) == 1 and evaluations(w) == 2
    b, labels, d = net.calls[0]
    assert b == 8 and labels == [1] * 4 + [NO_CLASS] * 4
    d_c, d_free = d[:4], d[4:]
    assert torch.equal(out, d_free + w * (d_c - d_free))  # exactly the formula
    # and, to float rounding, the formula on separate calls
    sep_c = cond(x, s, m, torch.ones(4, dtype=torch.long))
    sep_free = cond(x, s, m)
    assert torch.allclose(out, sep_free + w * (sep_c - sep_free), atol=1e-5)


def test_combine_closed_form():
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 5.0])
    assert torch.equal(combine(a, b, 1), b)
    assert torch.equal(combine(a, b, 0), a)
    assert torch.equal(combine(a, b, 3), torch.tensor([7.0, 19.0]))
