"""torch 2.13 crashes (segfault) in F.conv2d on a channels_last 7x1 input with stride (1, 2), padding
(0, 1), dilation (1, 2) and a bias (found by tests/fuzz): AutoSculpt's dense paths pass such inputs
contiguous, so a drop-in layer never crashes where its kernel would not. Run in a child process: if
the workaround regressed, the crash must not take the test session down."""
import subprocess
import sys

CODE = """
import torch
from torch import nn
import autosculpt as asc
x = torch.randn(2, 7, 1, 3).permute(0, 3, 1, 2)  # (2, 3, 7, 1), channels_last strides
conv = nn.Conv2d(3, 2, 1, stride=(1, 2), padding=(0, 1), dilation=(1, 2))
for path in ("dense", "sparse"):
    layer = asc.nn.PatternConv2d.from_dense(conv, torch.ones(2, 1, 1, dtype=torch.bool), path=path)
    y = layer(x)
    y.sum().backward()
    ref = torch.nn.functional.conv2d(x.contiguous(), conv.weight, conv.bias, (1, 2), (0, 1), (1, 2))
    torch.testing.assert_close(y, ref)
print("ok")
"""


def test_channels_last_spatial_one_does_not_crash_torch_conv():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
