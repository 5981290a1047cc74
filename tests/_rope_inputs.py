"""Random inputs for the rope_attention tests (forward and backward), on the GPU when there is one."""
from __future__ import annotations

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rand(*shape, dtype):
    return torch.randn(*shape, device=DEV).to(dtype)


def _coords(lead, kind, hi=24):
    """Token coordinates of shape (*lead, 3): random ints (as int32/int64/float32) or fractional floats."""
    c = torch.randint(0, hi, (*lead, 3), device=DEV)
    if kind == "int32":
        return c.to(torch.int32)
    if kind == "int64":
        return c
    if kind == "float":
        return c.to(torch.float32) * 0.75 + 0.5
    raise AssertionError(kind)


def _freqs(d, theta=100.0):
    """(3, d/2) frequencies: a sectioned 3D split (each pair turns with one axis) scaled so that angles
    wrap several times, plus a few pairs with two axes at once."""
    half = d // 2
    f = torch.zeros(3, half)
    base = 1.0 / theta ** (torch.arange(half, dtype=torch.float32) / max(half, 1))
    for j in range(half):
        f[j % 3, j] = base[j]
    f[1, ::4] += 0.37
    return f.to(DEV)


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)


def padding_masks(b, seq):
    """(b >= 5, seq >= 30) key-padding masks. Row 0: prefix of real tokens; row 1: all padding; row 2:
    random non-prefix; row 3: a run in the middle; row 4: all real."""
    m = torch.zeros(b, seq, dtype=torch.bool)
    m[0, :23] = True
    m[2] = torch.rand(seq) < 0.6
    m[2, 0] = False
    m[3, 7:30] = True
    m[4] = True
    return m.to(DEV)
