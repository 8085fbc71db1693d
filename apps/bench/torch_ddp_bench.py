#!/usr/bin/python3
"""PyTorch's own DistributedDataParallel as lockstep-bench's peer.

lockstep-bench starts one process per rank with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
set (loopback, a free port) and reads the JSON this script writes to --result. The models are
the ones in apps/bench/models.h, layer for layer and in the same registration order, so the
gradient buckets match; the data is synthetic, the same shapes and batch per rank.

With --device cuda (Note [lockstep-bench on CUDA] in scenarios.h) each rank trains on
cuda:<LOCAL_RANK % visible GPUs>, with DDP's device_ids set, over --backend gloo or nccl, and
every timed step ends with torch.cuda.synchronize() before the clock is read.

Only the standard library and torch (python3-torch) are used. Exit code 3 means this torch
cannot run the scenario (no torch, no CUDA in it, or no NCCL), so the caller can skip the
scenario with a note instead of failing.
"""
import argparse
import json
import os
import sys
import time

try:
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError as e:  # pragma: no cover - depends on the machine
    print("torch_ddp_bench: python3-torch is not installed (%s)" % e, file=sys.stderr)
    sys.exit(3)


class Mlp(nn.Module):
    def __init__(self, hidden=1024):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class FashionCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.fc1 = nn.Linear(64 * 5 * 5, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class TransformerStack(nn.Module):
    def __init__(self, layers=2, d_model=128, heads=4, ff=512):
        super().__init__()
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=ff, dropout=0.0)
            for _ in range(layers)])
        self.head = nn.Linear(d_model, 10)

    def forward(self, x):  # x: (batch, seq, d_model), as in models.h
        x = x.transpose(0, 1)
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean(0))


class LinearStack(nn.Module):
    """models.h's LinearStack: Linear layers of widths sizes[0] -> sizes[1] -> ..., ReLU between
    (deep_mlp, wide, deep)."""

    def __init__(self, sizes):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])])

    def forward(self, x):
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < n:
                x = F.relu(x)
        return x


def make_model(name):
    return {"mlp": Mlp, "small_mlp": lambda: Mlp(128), "deep_mlp": lambda: LinearStack([256] * 49), "cnn": FashionCnn,
            "transformer": TransformerStack,
            "wide": lambda: LinearStack([1024, 4096, 4096, 4096, 4096, 1000]),
            "deep": lambda: LinearStack([1024] * 49 + [1000])}[name]()


def make_batch(name, batch):
    g = torch.Generator().manual_seed(0)
    classes = 10
    if name in ("mlp", "small_mlp"):
        x = torch.randn(batch, 784, generator=g)
    elif name == "deep_mlp":
        x = torch.randn(batch, 256, generator=g)
        classes = 256
    elif name == "cnn":
        x = torch.randn(batch, 1, 28, 28, generator=g)
    elif name in ("wide", "deep"):
        x = torch.randn(batch, 1024, generator=g)
        classes = 1000
    else:
        x = torch.randn(batch, 32, 128, generator=g)
    return x, torch.randint(classes, (batch,), generator=g)


def vm_hwm_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def machine_busy_seconds():
    """CPU time all processes used so far, as lockstep-bench's proc.cpp counts it."""
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = v
    return (user + nice + system + steal) / os.sysconf("SC_CLK_TCK")


def why_unavailable(device, backend):
    """Why this torch cannot run the scenario (exit 3: skipped), or None."""
    if device == "cuda" and not torch.cuda.is_available():
        return ("--device cuda: expected a CUDA device, but torch.cuda.is_available() is False "
                "(torch %s: CPU-only, or no GPU is visible); install a CUDA build of torch on a "
                "GPU machine for PyTorch's side" % torch.__version__)
    if backend == "nccl" and not dist.is_nccl_available():
        return ("--backend nccl: this torch (%s) was built without NCCL" % torch.__version__)
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--bucket-cap-mb", type=float, default=25.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--allreduce-iters", type=int, default=10)
    ap.add_argument("--gradient-as-bucket-view", action="store_true")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    ap.add_argument("--result", required=True)
    a = ap.parse_args()
    if a.backend == "nccl" and a.device != "cuda":
        ap.error("--backend nccl: expected --device cuda (NCCL reduces CUDA tensors only), "
                 "but got --device %s" % a.device)
    unavailable = why_unavailable(a.device, a.backend)
    if unavailable:
        print("torch_ddp_bench: " + unavailable, file=sys.stderr)
        sys.exit(3)

    torch.set_num_threads(a.threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if a.device == "cuda":
        # Note [lockstep-bench on CUDA]: ranks of one host share GPU 0 on a one-GPU machine.
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))
                              % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(a.backend)
    rank, world = dist.get_rank(), dist.get_world_size()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    model = make_model(a.model).to(device)
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=a.bucket_cap_mb, gradient_as_bucket_view=a.gradient_as_bucket_view)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    x, y = make_batch(a.model, a.batch)
    x, y = x.to(device), y.to(device)

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()

    for _ in range(a.warmup):
        step()
    sync()
    dist.barrier()
    times = []
    # Note [Disturbed runs] in coordinator.h reads cpu_s, busy_s and wall_s.
    cpu0, busy0, start = time.process_time(), machine_busy_seconds(), time.perf_counter()
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        sync()  # the step's GPU work, not its kernel launches
        times.append((time.perf_counter() - t0) * 1e3)
    wall = time.perf_counter() - start
    cpu, busy = time.process_time() - cpu0, machine_busy_seconds() - busy0

    # The all-reduce time of all gradients in one flat tensor on the gradients' device: the
    # denominator of the exposed-communication fraction.
    n = sum(p.numel() for p in model.parameters())
    flat = torch.zeros(n, device=device)
    dist.barrier()
    ar = []
    for _ in range(a.allreduce_iters):
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        sync()
        ar.append((time.perf_counter() - t0) * 1e3)
    ar.sort()

    out = {
        "rank": rank, "world": world,
        "backend": "%s (torch %s)" % (a.backend, torch.__version__), "device": str(device),
        "params": n, "step_ms": times, "vmhwm_kb": vm_hwm_kb(),
        "wall_s": wall, "cpu_s": cpu, "busy_s": busy,
        "allreduce_all_grads_ms": ar[len(ar) // 2] if ar else None,
    }
    with open(a.result, "w") as f:
        json.dump(out, f)
    dist.barrier()
    # torch 1.13's Gloo teardown at interpreter exit has been seen to hang one rank for
    # minutes after both wrote their results; nothing is left to do, so leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
