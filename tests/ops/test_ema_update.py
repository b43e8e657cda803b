"""The one-pass EMA update (lamamba_dist/ops/ema_update.py) against DiT's two ops.

* GPU (``-m gpu``): bit-for-bit equal to ``mul_(d).add_(w, alpha=1 - d)`` over sizes around the block and a
  large buffer, and the trainer's ZeroEMA runs it on its flat buffers.
* CPU: the dispatch runs the reference there; the kernel itself under Triton's interpreter (TRITON_INTERPRET=1,
  a subprocess running this file), with a guard region after the buffer that must stay untouched.
"""

import os

import pytest
import torch

from kernel_helpers import needs_triton, run_interpreter_cases
from lamamba_dist.ops.ema_update import BLOCK, ema_update_, ema_update_reference, kernel_applies

SIZES = [1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17]


def _case(n, decay, device, use_kernel, seed=0):
    g = torch.Generator().manual_seed(seed + n)
    s = torch.randn(n + 64, generator=g).to(device)  # the 64 after n: a guard that must stay as it is
    w = torch.randn(n, generator=g).to(device)
    ref = s[:n].clone()
    ema_update_reference(ref, w, decay)
    guard = s[n:].clone()
    out = ema_update_(s[:n], w, decay, use_kernel=use_kernel)
    assert out.data_ptr() == s.data_ptr()
    assert torch.equal(s[n:], guard), "the kernel wrote past the end of the buffer"
    return s[:n], ref


def test_dispatch_on_cpu_runs_the_reference():
    s, w = torch.randn(10), torch.randn(10)
    assert not kernel_applies(s, w)
    got, ref = _case(1000, 0.9999, "cpu", None)
    assert torch.equal(got, ref)


def test_kernel_rejects_mismatched_buffers():
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="same number of elements"):
        ema_update_(torch.zeros(4), torch.zeros(5), 0.9, use_kernel=True)


@needs_triton
def test_kernel_under_the_triton_interpreter():
    run_interpreter_cases(__file__)


def _interpreter_cases():
    for n in SIZES:
        for decay in (0.9999, 0.5):
            got, ref = _case(n, decay, "cpu", True)
            # the interpreter's fma is numpy's multiply-add: within an ulp of the reference here, exact on GPUs
            torch.testing.assert_close(got, ref, rtol=2e-7, atol=1e-12)
    print("interpreter cases passed")


@pytest.mark.gpu
@pytest.mark.parametrize("decay", [0.9999, 0.999, 0.5])
def test_kernel_equals_two_ops_bitwise_on_gpu(decay):
    for n in SIZES + [(1 << 24) + 3]:
        got, ref = _case(n, decay, "cuda", None)
        assert kernel_applies(got, got)
        bad = (got != ref).sum().item()
        assert bad == 0, f"n={n} decay={decay}: {bad} elements differ (max {(got - ref).abs().max().item():.3e})"


@pytest.mark.gpu
def test_zero_ema_flat_buffers_use_the_kernel_and_match_dit_update():
    from lamamba_dist.train.ema import ZeroEMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.SiLU(), torch.nn.Linear(128, 8)).cuda()
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    ps = list(model.parameters())
    for p, v in zip(ps, torch._utils._unflatten_dense_tensors(flat, [p.data for p in ps])):
        p.data = v
    ema = ZeroEMA(model, 0.99)
    assert len(ema._flat) == 1 and kernel_applies(*ema._flat[0])
    plain = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(5):
        with torch.no_grad():
            flat.add_(torch.randn_like(flat) * 0.1)
        ema.update()
        for n, p in model.named_parameters():
            plain[n].mul_(0.99).add_(p.detach(), alpha=1 - 0.99)
    full = ema.full_state_dict(dst=None)
    assert all(torch.equal(full[n].cuda(), plain[n]) for n in plain)


def _flat_model(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.SiLU(), torch.nn.Linear(128, 8)).to(device)
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    ps = list(model.parameters())
    for p, v in zip(ps, torch._utils._unflatten_dense_tensors(flat, [p.data for p in ps])):
        p.data = v
    return model, flat


def test_zero_ema_overlap_off_gpus_is_the_plain_update():
    from lamamba_dist.train.ema import ZeroEMA

    model, flat = _flat_model("cpu")
    ema = ZeroEMA(model, 0.9, overlap=True)
    assert not ema.overlapped  # CPU tensors: no stream of its own
    before = {n: s.clone() for n, (_, s) in ema.shadow.items()}
    with torch.no_grad():
        flat.add_(1.0)
    ema.update()
    ema.join()
    for n, p in model.named_parameters():
        assert torch.equal(ema.shadow[n][1], before[n].mul(0.9).add(p.detach().reshape(-1), alpha=1 - 0.9))


@pytest.mark.gpu
def test_zero_ema_on_its_own_stream_waits_for_the_step_and_is_joined():
    """The update on the EMA's stream (ZeroEMA overlap) behind long work on the training stream: it must read the
    weights after the step it averages (the event), and the next step must not change them before it has read
    them (join). Bit for bit the plain update's result."""
    from lamamba_dist.train.ema import ZeroEMA

    model, flat = _flat_model("cuda")
    ema = ZeroEMA(model, 0.99, overlap=True)
    assert ema.overlapped
    plain = {n: p.detach().clone() for n, p in model.named_parameters()}
    a = torch.randn(2048, 2048, device="cuda")
    for i in range(8):
        ema.join()
        for _ in range(20):  # keeps the training stream busy, so that a missing wait would read early
            a = torch.tanh(a @ a * 1e-3)
        with torch.no_grad():
            flat.add_(torch.randn_like(flat) * 0.1 + a[0, 0])  # the "optimizer step", after the long work
        ema.update()
        for n, p in model.named_parameters():
            plain[n].mul_(0.99).add_(p.detach(), alpha=1 - 0.99)
    full = ema.full_state_dict(dst=None)  # joins
    assert all(torch.equal(full[n].cuda(), plain[n]) for n in plain)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1 (the test sets it)"
    _interpreter_cases()
