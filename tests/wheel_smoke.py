"""A smoke test of an installed seqkernels, run as a script in a child process.

Attention forward and backward against the float64 reference, the decode regime on a bf16
cache, a two-layer LSTM against torch's; prints the CPU capability that ran, the kernel
modules mapped into the process and where seqkernels was imported from. Used by
tests/test_cpu_dispatch.py (once per capability, SEQKERNELS_CPU_CAPABILITY set) and by
`make wheel-check` (an installed wheel, avx2 forced).
"""

import re

import torch

import seqkernels
from seqkernels import reference

torch.manual_seed(0)
q = torch.randn(2, 4, 67, 40, dtype=torch.float64, requires_grad=True)
k = torch.randn(2, 2, 131, 40, dtype=torch.float64, requires_grad=True)
v = torch.randn(2, 2, 131, 40, dtype=torch.float64, requires_grad=True)
args = [t.detach().float().requires_grad_() for t in (q, k, v)]
out = seqkernels.flash_attention(*args, causal=True)
ref = reference.flash_attention(q, k, v, causal=True)[0]
out.backward(torch.ones_like(out))
ref.backward(torch.ones_like(ref))
torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
for a, t in zip(args, (q, k, v)):
    torch.testing.assert_close(a.grad.double(), t.grad, rtol=1e-4, atol=1e-4)

qb, kb, vb = (t.detach().bfloat16() for t in (q[:, :, :1], k, v))  # one query row: the decode kernel
torch.testing.assert_close(seqkernels.flash_attention(qb, kb, vb).double(),
                           reference.flash_attention(qb.double(), kb.double(), vb.double())[0], rtol=1e-2, atol=1e-2)

lstm = torch.nn.LSTM(24, 32, num_layers=2)
ours = seqkernels.nn.LSTM(24, 32, num_layers=2)
ours.load_state_dict(lstm.state_dict())
x = torch.randn(9, 3, 24)
torch.testing.assert_close(ours(x)[0], lstm(x)[0], rtol=1e-5, atol=1e-5)

with open("/proc/self/maps") as f:
    maps = f.read()
print("capability", seqkernels.build_info()["cpu_capability"])
print("modules", sorted(set(re.findall(r"(_cpu_[a-z0-9_]+?)\.cpython", maps))))
print("imported from", seqkernels.__file__)
