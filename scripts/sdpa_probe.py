"""Which SDPA kernels accept LaMamba's window-attention shapes (bias with grad), and their fwd+bwd times."""
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

warnings.simplefilter("always")
for e, bw in ((20, 64 * 16), (40, 64 * 4), (80, 64)):
    h, n = 16, 64
    q, k, v = (torch.randn(bw, h, n, e, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, h, n, n, device="cuda", requires_grad=True)
    for be in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH, None):
        def run():
            m = bias.to(q.dtype).expand(bw, h, n, n)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
            out.float().sum().backward()
        def manual():
            a = (q * e ** -0.5) @ k.transpose(-2, -1) + bias.to(q.dtype)
            out = a.float().softmax(-1).to(q.dtype) @ v
            out.float().sum().backward()
        fn = manual if be is None else run
        try:
            with (sdpa_kernel([be]) if be is not None else torch.autograd.graph.save_on_cpu(False) if False else torch.no_grad.__class__()) if False else (sdpa_kernel([be]) if be is not None else torch.enable_grad()):
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                st, en = torch.cuda.Event(True), torch.cuda.Event(True)
                st.record()
                for _ in range(10):
                    fn()
                en.record()
                torch.cuda.synchronize()
            print(f"e={e} {be}: {st.elapsed_time(en) / 10:.3f} ms")
        except Exception as ex:
            print(f"e={e} {be}: FAILED {str(ex)[:200]}")
