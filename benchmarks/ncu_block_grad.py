import sys, torch
sys.path.insert(0, "benchmarks")
from block_grad import inputs
from mal import fused
from mal.fused import gate_weights
from mal.kernels import block_grad_triton as bg
B, S, NH, DH = 128, 197, 4, 384
I = NH * DH
pre, post, h, cot = inputs(B, S, NH, DH)
xz = pre[0]
w_c, w_m, _ = gate_weights(*pre[9:], *pre[3:9])
du = torch.randn(B, S, I, device="cuda").bfloat16()
d_qkv = [torch.randn(B, S, I, device="cuda").bfloat16() for _ in range(3)]
dg = torch.randn(B, S, 2 * NH, device="cuda").bfloat16()
for _ in range(2):
    packed = bg.post_grad(du, h, xz, *post[:5], fused.POST_LN_EPS)[1]
    bg.pre_grad(*d_qkv, dg, packed, xz, *pre[1:3], pre[3], pre[5], pre[7], w_c, w_m)
torch.cuda.synchronize()
print("ok")
