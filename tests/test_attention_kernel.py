"""The Triton flash-attention kernel against the plain PyTorch reference.

The kernel runs on the CPU under the Triton interpreter, which must be switched
on (TRITON_INTERPRET=1) before triton is imported, so the checks run in a
fresh subprocess; this file compares what it reports. bf16 is left to the
GPU tests at the end (the interpreter computes it wrongly), which CI skips.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

pytest.importorskip("triton")  # installed with torch on x86_64 Linux (requirements.txt), as in CI

# (B*H, N, M, d): several blocks and partial blocks, few keys, one key, odd head dims, and the
# default UNet's own shapes (self-attention at 8x8: N = M = 64, d = 32; cross-attention: M = 8 tokens).
SHAPES = [(2, 16, 16, 32), (2, 80, 80, 32), (2, 80, 8, 64), (1, 130, 77, 64), (2, 33, 1, 32), (1, 64, 64, 48),
          (2, 64, 64, 32), (2, 1024, 8, 32), (2, 256, 8, 32)]

CHECK = textwrap.dedent("""
    import json, sys, torch
    import unet
    from unet import attention_reference, flash_attention
    out = []
    for (BH, N, M, d) in json.loads(sys.argv[1]):
        for dtype in (torch.float32, torch.float16):
            g = torch.Generator().manual_seed(N * 1000 + M)
            # q, k, v as strided views of one buffer, like the UNet's rearranges: (BH, 1, N, d) each
            buf = torch.randn(BH, max(N, M), 3, 1, d, generator=g).to(dtype)
            q, k, v = (buf[:, :n, i].transpose(1, 2).requires_grad_() for i, n in enumerate((N, M, M)))
            do = torch.randn(q.shape, generator=g).to(dtype)
            o = flash_attention(q, k, v)
            grads = torch.autograd.grad(o, (q, k, v), do)
            # the backward once more with one query slice per key block: dk, dv are then written
            # directly instead of as partial sums; both must give the same gradients
            split_err = None
            if dtype == torch.float32:  # (once per shape: the interpreter is slow)
                unet.BACKWARD_PROGRAMS = 1
                grads_1 = torch.autograd.grad(flash_attention(q, k, v), (q, k, v), do)
                unet.BACKWARD_PROGRAMS = 512
                split_err = max(((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()
                                for a, b in zip(grads_1, grads))
            if N == 80 and M == 8:  # the custom op that torch.compile traces runs the same kernels
                o_op = unet._flash_attention_op(q, k, v)[0]
                assert torch.equal(o_op, o)
                assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(o_op, (q, k, v), do), grads))
            q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
            o_ref = attention_reference(q32, k32, v32)
            ref_grads = torch.autograd.grad(o_ref, (q32, k32, v32), do.float())
            err = [((a.float() - b).abs().max() / b.abs().max().clamp(min=1.0)).item()  # relative, absolute below 1
                   for a, b in zip((o, *grads), (o_ref, *ref_grads))]
            out.append(dict(shape=[BH, N, M, d], dtype=str(dtype), err=err, split_err=split_err))

    # the whole default UNet, forward and backward, with the kernel and with the reference
    from unet import UNet, UNetConfig
    torch.manual_seed(0)
    nets = {impl: UNet(UNetConfig(attention_impl=impl)) for impl in ("triton", "torch")}
    nets["torch"].load_state_dict(nets["triton"].state_dict())
    for p in nets["triton"].parameters():  # no zero-initialised layers: every path must matter
        torch.nn.init.normal_(p, std=0.05)
    nets["torch"].load_state_dict(nets["triton"].state_dict())
    x, t, ctx = torch.randn(2, 3, 32, 32), torch.tensor([10, 900]), torch.randn(2, 8, 128)
    outs, grads = {}, {}
    for impl, net in nets.items():
        outs[impl] = net(x, t, ctx)
        outs[impl].square().mean().backward()
        grads[impl] = torch.cat([p.grad.flatten() for p in net.parameters()])
    unet_err = [((outs["triton"] - outs["torch"]).abs().max() / outs["torch"].abs().max()).item(),
                ((grads["triton"] - grads["torch"]).abs().max() / grads["torch"].abs().max()).item()]
    print(json.dumps(dict(cases=out, unet=unet_err)))
""")


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", CHECK, json.dumps(SHAPES)], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("i", range(2 * len(SHAPES)))
def test_kernel_matches_reference(results, i):
    r = results["cases"][i]
    tol = 1e-5 if r["dtype"] == "torch.float32" else 1e-2  # of the largest entry (or absolute, below 1)
    for name, e in zip(["o", "dq", "dk", "dv"], r["err"]):
        assert e < tol, f"{name} off by {e:.2e} (relative) for {r['shape']} {r['dtype']}"
    # fp32 partial sums against direct writes: only the rounding of the last cast differs (checked in fp32 only)
    assert (r["split_err"] is None) == (r["dtype"] != "torch.float32")
    if r["split_err"] is not None:
        assert r["split_err"] < tol, f"one slice vs several: off by {r['split_err']:.2e} for {r['shape']}"


def test_unet_with_kernel_matches_reference(results):
    out_err, grad_err = results["unet"]
    assert out_err < 1e-4 and grad_err < 1e-4, results["unet"]


COMPILE = textwrap.dedent("""
    import json, sys
    from multiprocessing import Pool

    def jobs(targets):
        import unet
        done = set()
        for arch, ptrs, ds in targets:
            for ptr in ptrs:
                for d in ds:
                    for M in (8, 64):  # both key blocks
                        launch = unet._blocks(M, d)
                        options = {k: launch.pop(k) for k in ("num_warps", "num_stages")}
                        for kernel in (unet._attn_fwd, unet._attn_bwd_dq, unet._attn_bwd_dkdv):
                            consts = {k: v for k, v in {"D": d, **launch}.items() if k in kernel.arg_names}
                            key = (arch, ptr, kernel.__name__, tuple(consts.items()))
                            if key not in done:
                                done.add(key)
                                yield arch, ptr, kernel.__name__, consts, options

    def compile_one(job):
        import triton, unet
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        arch, ptr, name, consts, options = job
        kernel = getattr(unet, name)
        sig = {arg: "constexpr" if arg in consts
               else "*fp32" if arg in ("LSE", "DELTA")
               else ptr if arg in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")
               else "fp32" if arg == "sm_scale" else "i32"
               for arg in kernel.arg_names}
        triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", arch, 32), options=options)

    if __name__ == "__main__":
        work = list(jobs(json.loads(sys.argv[1])))
        with Pool(2) as pool:  # compiling is single-threaded: use both cores
            pool.map(compile_one, work)
        print(len(work))
""")


# sm_90 (H100): every dtype and head-dim block the dispatch can pick; sm_80 (A100): a spot check.
# A cold compile takes about 0.8 s per kernel; the list is compiled on two processes.
TARGETS = [(90, ["*fp16", "*bf16", "*fp32"], [16, 32, 64, 128]), (80, ["*bf16"], [32, 64])]


def test_kernels_compile_for_the_gpu():
    """Compile for sm_90 and sm_80 without a GPU: catches what the interpreter lets through (a tl.dot under 16)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(TARGETS)], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each of the 3 kernels for every pointer type and head dim of TARGETS (3 x 4 + 1 x 2) and both key blocks
    assert int(proc.stdout.split()[-1]) == 3 * (3 * 4 + 1 * 2) * 2


# -----------------------------------------------------------------------------
# On a GPU: the compiled kernel itself (CI has none, so these are skipped there; run them where one is)

cuda = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
# of the largest entry (absolute below 1). fp32 inputs go through tl.dot as TF32, which keeps fp16's 10-bit
# mantissa, so fp32 gets fp16's tolerance: with a single key, dk should be 0 and TF32 leaves 6.5e-3 of it (H100)
GPU_TOL = {"float32": 1e-2, "float16": 1e-2, "bfloat16": 3e-2}


@cuda
@pytest.mark.parametrize("dtype", list(GPU_TOL))
def test_kernel_on_gpu_matches_reference(dtype):
    import torch
    from unet import attention_reference, flash_attention
    dt = getattr(torch, dtype)
    for BH, N, M, d in SHAPES + [(64 * 2, 64, 64, 32), (64, 1024, 8, 32), (4 * 16, 4096, 4096, 64)]:
        g = torch.Generator("cuda").manual_seed(N * 1000 + M)
        buf = torch.randn(BH, max(N, M), 3, 1, d, generator=g, device="cuda")  # strided views, as in the UNet
        q, k, v = (buf[:, :n, i].transpose(1, 2) for i, n in enumerate((N, M, M)))  # (BH, 1, n, d) each
        do = torch.randn(q.shape, generator=g, device="cuda")
        ins = [t.to(dt).requires_grad_() for t in (q, k, v)]
        o = flash_attention(*ins)
        grads = torch.autograd.grad(o, ins, do.to(dt))
        ref_ins = [t.detach().double().requires_grad_() for t in (q, k, v)]  # fp64: no TF32 in the reference
        o_ref = attention_reference(*ref_ins)
        ref_grads = torch.autograd.grad(o_ref, ref_ins, do.double())
        for name, a, b in zip(["o", "dq", "dk", "dv"], (o, *grads), (o_ref, *ref_grads)):
            err = ((a.double() - b).abs().max() / b.abs().max().clamp(min=1.0)).item()
            assert err < GPU_TOL[dtype], f"{name} off by {err:.2e} for {(BH, N, M, d)} {dtype}"


@cuda
def test_unet_on_gpu_with_kernel_matches_sdpa():
    """The default UNet's training gradients on the GPU, our kernel against PyTorch's SDPA, in fp32 (TF32
    matmuls in both) and under bf16 autocast, as train.py --amp runs it."""
    import torch
    from unet import UNet, UNetConfig
    torch.manual_seed(0)
    nets = {impl: UNet(UNetConfig(attention_impl=impl)).cuda() for impl in ("triton", "sdpa")}
    for p in nets["triton"].parameters():  # no zero-initialised layers: every path must matter
        torch.nn.init.normal_(p, std=0.05)
    nets["sdpa"].load_state_dict(nets["triton"].state_dict())
    x, t, ctx = torch.randn(8, 3, 32, 32).cuda(), torch.randint(0, 1000, (8,)).cuda(), torch.randn(8, 8, 128).cuda()
    for dtype, tol in ((torch.float32, 1e-2), (torch.bfloat16, 5e-2)):
        outs, grads = {}, {}
        for impl, net in nets.items():
            net.zero_grad()
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                outs[impl] = net(x, t, ctx).float()
            outs[impl].square().mean().backward()
            grads[impl] = torch.cat([p.grad.flatten() for p in net.parameters()])
        out_err = ((outs["triton"] - outs["sdpa"]).abs().max() / outs["sdpa"].abs().max()).item()
        grad_err = ((grads["triton"] - grads["sdpa"]).abs().max() / grads["sdpa"].abs().max()).item()
        assert out_err < tol and grad_err < tol, (dtype, out_err, grad_err)
