"""
Benchmark the fused Triton attention kernel against PyTorch's SDPA backends (a script, not a test).

    python tests/benchmarks/attention.py            # needs CUDA; on a CPU it says so and exits 0
    python tests/benchmarks/attention.py --sweep    # also try other block sizes at the standard shape
    python tests/benchmarks/attention.py --unet-sweep --overhead   # launch configs and CPU cost at the UNet's shapes

Prints, per shape: the largest error against the fp32 reference, and TFLOP/s for
the forward and the forward+backward of our kernel, SDPA-flash, SDPA-cuDNN and
SDPA-efficient (a backend that does not support a shape prints '-'). Then UNet
training steps per second with each attention implementation, and with
channels-last convolutions, at the default run's shape and at larger ones.
FLOPs: forward 4*B*H*N*M*d, backward 2.5x the forward (the FlashAttention convention).
Every table is printed as markdown; the first line names the command, the commit and the GPU.

TF32: the UNet step table turns on TF32 for matmuls and convolutions, so its fp32
rows are "fp32 with TF32"; train.py does not enable TF32 for matmuls.
"""
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import unet  # noqa: E402
from plumbing.cli import script_parser  # noqa: E402
from unet import UNet, UNetConfig, attention_reference, flash_attention  # noqa: E402

# (name, B, H, N, M, d, dtype): the default UNet's attention at batch 64 on 32x32 and on 64x64 inputs,
# and the standard flash-attention shape
SHAPES = [
    ("self 8x8 (32px input)", 64, 2, 64, 64, 32, torch.bfloat16),
    ("cross 32x32, 8 tokens", 64, 1, 1024, 8, 32, torch.bfloat16),
    ("cross 16x16, 8 tokens", 64, 2, 256, 8, 32, torch.bfloat16),
    ("self 16x16 (64px input)", 64, 2, 256, 256, 32, torch.bfloat16),
    ("cross 64x64, 8 tokens", 64, 1, 4096, 8, 32, torch.bfloat16),
    ("standard B4 H16 N4096 d64", 4, 16, 4096, 4096, 64, torch.bfloat16),
    ("standard, fp16", 4, 16, 4096, 4096, 64, torch.float16),
]


def commit():
    """The short hash of the checked-out commit (with '+changes' when the tree differs), for the table's caption."""
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    try:
        return (git("rev-parse", "--short", "HEAD") or "an unknown commit") + ("+changes" if git("status", "--porcelain") else "")
    except OSError:  # no git
        return "an unknown commit"


def sdpa(backend):
    def fn(q, k, v):
        with torch.nn.attention.sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return fn


IMPLS = {
    "ours": flash_attention,
    "sdpa-flash": sdpa(torch.nn.attention.SDPBackend.FLASH_ATTENTION),
    "sdpa-cudnn": sdpa(torch.nn.attention.SDPBackend.CUDNN_ATTENTION),
    "sdpa-efficient": sdpa(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION),
}


def bench_ms(fn):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100)


def measure(fn, q, k, v, do):
    """(forward ms, forward+backward ms), or None where the backend refuses the shape."""
    try:
        fwd = bench_ms(lambda: fn(q, k, v))
        def step():
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(do)
        both = bench_ms(step)
        return fwd, both
    except RuntimeError:
        return None


def check(B, H, N, M, d, dtype):
    """Largest error of the kernel (output and grads) against the fp32 reference, relative to the largest entry."""
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, n, d, device="cuda", generator=g) for n in (N, M, M))
    do = torch.randn(B, H, N, d, device="cuda", generator=g)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, do)
    ours_in = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = flash_attention(*ours_in)
    grads = torch.autograd.grad(out, ours_in, do.to(dtype))
    return max(((a.float() - b).abs().max() / b.abs().max().clamp(min=1.0)).item()
               for a, b in zip((out, *grads), (ref, *ref_grads)))


def markdown_header(*columns):
    """The first two lines of a markdown table."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def attention_table():
    print("\nTFLOP/s, forward / forward+backward ('-' = the backend does not support this shape)\n")
    markdown_header("shape (B, H, N, M, d)", "dtype", "max err", *IMPLS)
    for name, B, H, N, M, d, dtype in SHAPES:
        err = check(min(B, 4), H, N, M, d, dtype)
        q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=dtype, requires_grad=True) for n in (N, M, M))
        do = torch.randn(B, H, N, d, device="cuda", dtype=dtype)
        flops = 4 * B * H * N * M * d
        cells = []
        for fn in IMPLS.values():
            r = measure(fn, q, k, v, do)
            cells.append("-" if r is None else f"{flops / r[0] / 1e9:.1f} / {3.5 * flops / r[1] / 1e9:.1f}")
        print(f"| {name} ({B}, {H}, {N}, {M}, {d}) | {str(dtype).split('.')[-1]} | {err:.1e} | "
              + " | ".join(cells) + " |", flush=True)


def sweep():
    """Try block sizes at the standard shape; the dispatch's choice is in unet._blocks."""
    B, H, N, M, d = 4, 16, 4096, 4096, 64
    q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for n in (N, M, M))
    do = torch.randn_like(q)
    flops = 4 * B * H * N * M * d
    original = unet._blocks
    print("\nblock sizes at the standard shape (bf16), TFLOP/s\n")
    markdown_header("BLOCK_N", "BLOCK_M", "warps", "stages", "fwd", "fwd+bwd")
    for bn, bm, warps, stages in [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3),
                                  (128, 128, 8, 3), (128, 32, 4, 3), (64, 32, 4, 3)]:
        unet._blocks = lambda M_, D_: dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=max(16, D_),
                                           num_warps=warps, num_stages=stages)
        try:
            fwd, both = measure(flash_attention, q, k, v, do)
            print(f"| {bn} | {bm} | {warps} | {stages} | {flops / fwd / 1e9:.1f} | {3.5 * flops / both / 1e9:.1f} |",
                  flush=True)
        except Exception as e:  # e.g. out of shared memory
            print(f"| {bn} | {bm} | {warps} | {stages} | {type(e).__name__} | |")
    unet._blocks = original


UNET_SHAPES = [s for s in SHAPES if s[0].startswith(("self", "cross"))]


def set_blocks(bn, bm_many, warps, stages):
    """Replace the dispatch's launch configuration (bm_many: keys per step when there are more than 16)."""
    import triton
    unet._blocks = lambda M_, D_: dict(BLOCK_N=bn, BLOCK_M=16 if M_ <= 16 else bm_many,
                                       BLOCK_D=max(16, triton.next_power_of_2(D_)), num_warps=warps, num_stages=stages)


def unet_sweep():
    """Launch configurations at the UNet's shapes, forward and forward+backward TFLOP/s."""
    original, programs = unet._blocks, unet.BACKWARD_PROGRAMS
    configs = [(64, 64, 4, 3, 512), (32, 64, 4, 3, 512), (32, 32, 2, 2, 512), (128, 64, 4, 3, 512),
               (64, 64, 4, 2, 512), (64, 32, 4, 3, 512), (64, 64, 4, 3, 128), (64, 64, 4, 3, 256),
               (64, 64, 4, 3, 1024), (32, 64, 4, 3, 1024)]
    print("\nlaunch configurations at the UNet's shapes (fwd / fwd+bwd TFLOP/s); "
          f"dispatch now: {original(8, 32)} and BACKWARD_PROGRAMS {programs}\n")
    markdown_header("BLOCK_N, BLOCK_M, warps, stages, programs", *(n for n, *_ in UNET_SHAPES))
    for bn, bm, warps, stages, progs in configs:
        set_blocks(bn, bm, warps, stages)
        unet.BACKWARD_PROGRAMS = progs
        cells = []
        for name, B, H, N, M, d, dtype in UNET_SHAPES:
            q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=dtype, requires_grad=True) for n in (N, M, M))
            do = torch.randn(B, H, N, d, device="cuda", dtype=dtype)
            flops = 4 * B * H * N * M * d
            try:
                fwd, both = measure(flash_attention, q, k, v, do)
                cells.append(f"{flops / fwd / 1e9:.1f} / {3.5 * flops / both / 1e9:.1f}")
            except Exception as e:  # e.g. out of shared memory
                cells.append(type(e).__name__)
        print(f"| {bn}, {bm}, {warps}, {stages}, {progs} | " + " | ".join(cells) + " |", flush=True)
    unet._blocks, unet.BACKWARD_PROGRAMS = original, programs


def overhead(calls=200):
    """Is a forward+backward at the UNet's shapes bound by the GPU or by the CPU that launches it?
    Prints the GPU time per call (CUDA events) next to the CPU time to issue one call."""
    import time
    print("\nforward+backward per call, microseconds: GPU time (do_bench) / CPU time to launch\n")
    markdown_header("shape", *IMPLS)
    for name, B, H, N, M, d, dtype in UNET_SHAPES:
        q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=dtype, requires_grad=True) for n in (N, M, M))
        do = torch.randn(B, H, N, d, device="cuda", dtype=dtype)
        cells = []
        for fn in IMPLS.values():
            def step():
                q.grad = k.grad = v.grad = None
                fn(q, k, v).backward(do)
            try:
                gpu = bench_ms(step) * 1e3
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(calls):
                    step()
                cpu = (time.perf_counter() - t0) / calls * 1e6
                torch.cuda.synchronize()
                cells.append(f"{gpu:.0f} / {cpu:.0f}")
            except RuntimeError:
                cells.append("-")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


STEP_VARIANTS = ("Triton kernel", "reference", "SDPA", "SDPA + channels-last")


def unet_steps(batch=64, size=32, dtype=torch.bfloat16, rounds=3):
    """Training steps per second of the default UNet with each attention implementation: our kernel,
    the plain reference, SDPA (PyTorch picks its backend), and SDPA with channels-last convolutions
    (what model.to_device does on a CPU); one markdown row, in STEP_VARIANTS' order. Median of rounds
    that alternate them. dtype float32 = fp32 weights with TF32 matmuls and convolutions turned on here
    (train.py leaves matmuls at full fp32: it does not enable TF32); bfloat16 = autocast, as with --amp."""
    import statistics
    reference = unet.attention_reference
    sdpa_any = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    variants = {"triton": ("triton", False), "torch": ("torch", False), "sdpa": ("sdpa", False),
                "sdpa+channels-last": ("sdpa", True)}
    steps = {}
    for name, (impl, channels_last) in variants.items():
        torch.manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net = UNet(UNetConfig(image_size=size, attention_impl="triton" if impl == "triton" else "torch"))
        net = net.cuda().to(memory_format=fmt)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
        x = torch.randn(batch, 3, size, size, device="cuda").to(memory_format=fmt)
        t = torch.randint(0, 1000, (batch,), device="cuda")
        ctx = torch.randn(batch, 8, 128, device="cuda")

        def step(net=net, opt=opt, x=x, t=t, ctx=ctx, impl=impl):
            unet.attention_reference = sdpa_any if impl == "sdpa" else reference
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                loss = net(x, t, ctx).float().square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            unet.attention_reference = reference
        steps[name] = step
    ms = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            ms[name].append(bench_ms(step))
    precision = "fp32 with TF32" if dtype == torch.float32 else str(dtype).split(".")[-1]
    print(f"| {size}x{size}, batch {batch}, {precision} | " +
          " | ".join(f"{1000 / statistics.median(v):.1f}" for v in ms.values()) + " |", flush=True)


def build_parser():
    p = script_parser(__doc__)
    p.add_argument("--sweep", action="store_true", help="try other block sizes at the standard shape")
    p.add_argument("--unet-sweep", action="store_true", help="try launch configurations at the UNet's shapes")
    p.add_argument("--overhead", action="store_true", help="GPU time against CPU launch time at the UNet's shapes")
    p.add_argument("--steps-only", action="store_true", help="only the UNet training steps (skip the kernel table)")
    return p


if __name__ == "__main__":
    args = build_parser().parse_args()
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU; on the CPU the UNet uses the PyTorch reference attention")
        sys.exit(0)
    print(f"`python {' '.join(sys.argv)}` on {commit()}: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if not args.steps_only:
        attention_table()
    if args.sweep:
        sweep()
    if args.unet_sweep:
        unet_sweep()
    if args.overhead:
        overhead()
    # the default run's shape (fp32, batch 32), then more work per step: bf16, larger batches and images
    print("\nUNet training steps/s, the median of 3 rounds that alternate the variants\n")
    markdown_header("UNet step", *STEP_VARIANTS)
    for batch, size, dtype in [(32, 32, torch.float32), (64, 32, torch.bfloat16), (64, 64, torch.bfloat16),
                               (256, 64, torch.bfloat16), (256, 64, torch.float32)]:
        unet_steps(batch, size, dtype)
