"""PyTorch's own DistributedDataParallel as an oracle for lockstep's (test_ddp_oracle.cpp).

Usage: /usr/bin/python3 ddp_oracle.py DIR

DIR/input.txt + DIR/input.bin hold the initial state dict of the model below and the data
(x: [steps, world, batch, 1, 8, 8] float32, y: [steps, world, batch] int64), written by the C++
test as raw little-endian tensors with a manifest ("name<TAB>dtype<TAB>d0,d1,..." per line).
With "rank_steps" (int64 [world]) and "divide_initial" (int64 [1]) in the input, the model is
JoinNet and rank r trains only on its first rank_steps[r] steps inside ddp.join(...).
Runs `world` processes with torch.distributed (Gloo, file:// rendezvous in DIR), trains with
DDP, and writes rank 0's final parameters and buffers to DIR/result.txt + DIR/result.bin in the
same format. Exits non-zero if the ranks' parameters differ.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(144, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class JoinNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def read_tensors(stem):
    out = {}
    with open(stem + ".bin", "rb") as f:
        blob = f.read()
    offset = 0
    for line in open(stem + ".txt"):
        name, dtype, dims = line.rstrip("\n").split("\t")
        shape = [int(d) for d in dims.split(",")] if dims else []
        t = torch.empty(shape, dtype=DTYPES[dtype])
        n = t.numel() * t.element_size()
        t.view(-1).view(torch.uint8).copy_(torch.frombuffer(bytearray(blob[offset:offset + n]),
                                                            dtype=torch.uint8))
        offset += n
        out[name] = t
    return out


def write_tensors(stem, tensors):
    names = {v: k for k, v in DTYPES.items()}
    with open(stem + ".txt", "w") as txt, open(stem + ".bin", "wb") as bin_:
        for name, t in tensors.items():
            t = t.detach().contiguous()
            txt.write("%s\t%s\t%s\n" % (name, names[t.dtype], ",".join(str(d) for d in t.shape)))
            bin_.write(t.view(-1).view(torch.uint8).numpy().tobytes())


def worker(rank, world, directory, steps):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(directory, "store"),
                            rank=rank, world_size=world)
    data = read_tensors(os.path.join(directory, "input"))
    joining = "rank_steps" in data
    model = JoinNet() if joining else Net()
    model.load_state_dict({k[len("state."):]: v for k, v in data.items() if k.startswith("state.")})
    ddp = DDP(model, bucket_cap_mb=25)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(s):
        opt.zero_grad()
        loss = F.cross_entropy(ddp(data["x"][s][rank]), data["y"][s][rank])
        loss.backward()
        opt.step()

    if joining:
        divide = bool(data["divide_initial"][0].item())
        with ddp.join(divide_by_initial_world_size=divide):
            for s in range(int(data["rank_steps"][rank].item())):
                step(s)
    else:
        for s in range(steps):
            step(s)
    write_tensors(os.path.join(directory, "result_rank%d" % rank), model.state_dict())
    if joining:
        # PyTorch 1.13 sometimes hangs destroying a DDP object that went through join(): leave
        # without destructors once the result is written.
        sys.stdout.flush()
        os._exit(0)
    dist.destroy_process_group()


def main():
    directory = sys.argv[1]
    data = read_tensors(os.path.join(directory, "input"))
    steps, world = data["x"].shape[0], data["x"].shape[1]
    mp.spawn(worker, args=(world, directory, steps), nprocs=world, join=True)
    results = [read_tensors(os.path.join(directory, "result_rank%d" % r)) for r in range(world)]
    for r in range(1, world):
        for name, value in results[0].items():
            if "running" in name or "num_batches" in name:
                continue  # buffers are per rank until the next broadcast
            if not torch.equal(value, results[r][name]):
                print("rank %d differs from rank 0 in %s" % (r, name), file=sys.stderr)
                return 1
    write_tensors(os.path.join(directory, "result"), results[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
