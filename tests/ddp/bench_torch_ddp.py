"""PyTorch DDP peer of ddp_bench.cpp: same models, batch, optimizer, bucket cap and threads.

Usage: /usr/bin/python3 bench_torch_ddp.py --model mlp|deep|cnn [--world 2] [--steps 60]
       [--warmup 10] [--bucket-cap 25] [--plain]
"""
import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F


def make(name):
    if name == "mlp":
        return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                             nn.Linear(1024, 10)), (784,)
    if name == "deep":
        layers = []
        for _ in range(48):
            layers += [nn.Linear(256, 256), nn.ReLU()]
        return nn.Sequential(*layers), (256,)

    class Cnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(1, 32, 3)
            self.c2 = nn.Conv2d(32, 64, 3)
            self.f1 = nn.Linear(9216, 128)
            self.f2 = nn.Linear(128, 10)

        def forward(self, x):
            x = F.relu(self.c2(F.relu(self.c1(x))))
            x = F.max_pool2d(x, 2).flatten(1)
            return self.f2(F.relu(self.f1(x)))
    return Cnn(), (1, 28, 28)


def worker(rank, args, store):
    torch.set_num_threads(1)
    if not args.plain:
        dist.init_process_group("gloo", init_method="file://" + store, rank=rank,
                                world_size=args.world)
    torch.manual_seed(0)
    model, shape = make(args.model)
    net = model if args.plain else torch.nn.parallel.DistributedDataParallel(
        model, bucket_cap_mb=args.bucket_cap)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    torch.manual_seed(rank + 1)
    y = torch.randint(0, 10, (64,))
    x = torch.randn((64,) + shape)
    times = []
    if not args.plain:
        dist.barrier()
    for s in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        t1 = time.perf_counter()
        if s >= args.warmup:
            times.append((t1 - t0) * 1000)
    if rank == 0:
        print("torch model=%s mode=%s world=%d median_ms=%.3f mean_ms=%.3f" % (
            args.model, "plain" if args.plain else "ddp", 1 if args.plain else args.world,
            statistics.median(times), statistics.mean(times)), flush=True)
    if not args.plain:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mlp")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--bucket-cap", type=float, default=25)
    p.add_argument("--plain", action="store_true")
    args = p.parse_args()
    store = os.path.join(tempfile.mkdtemp(), "store")
    world = 1 if args.plain else args.world
    mp.spawn(worker, args=(args, store), nprocs=world, join=True)


if __name__ == "__main__":
    main()
