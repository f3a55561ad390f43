"""Several processes: `torchrun --nproc_per_node N train.py <flags>` (or evaluation.py).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; without them this module
is inert (one process, world size 1) and `python train.py` runs exactly as before. What is exact:

  * Batches. --batch_size is the global batch. Every process draws the same permutation of the
    training set each epoch (a pure function of --seed and the epoch, whatever the world size)
    and takes its contiguous share of each global batch (GlobalBatchSampler).
  * Loss. CASC's hinge takes the hardest negative of the whole batch, so the caption side is
    gathered from every process with gradients (`Gather`); each process scores its images
    against all captions, and the (B, B) score matrix and the label logits are gathered, so every
    process computes the single-process loss of the global batch. Each process back-propagates
    that same loss: the gathers' backward sums the gradients of every process's copy (N times
    the gradient), and one flat all_reduce of all gradients divided by N (`average_gradients`,
    not DistributedDataParallel, which is not used) brings it back to the single-process gradient.
  * Scores. Evaluation plans one pass of (caption batch, image chunk) items, the same for any
    number of processes (scoring.plan_work), deals them out by pairs, about 1/N of them to each
    process (`deal`), and sums the partial matrices on rank 0: every score is computed in the
    chunk one process computes it in, so the matrix is one process's, bit for bit.
"""
import contextlib
import datetime
import json
import math
import os
import re
import time

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler

import util

TIMEOUT_SECONDS = 600  # a collective that waits longer (a process died or hangs) ends the run


class PeerError(OSError):
    """A collective failed: another process died, failed or hangs (one line, like other OSErrors)."""


@contextlib.contextmanager
def _collective():
    try:
        yield
    except RuntimeError as e:  # gloo's and NCCL's errors (DistBackendError is one)
        text = re.sub(r'^\[[^\]]*\]\s*', '', str(e).strip())  # drop gloo's [source.cc:line]
        first = re.split(r'(?<=[.!])\s', text, maxsplit=1)[0]
        raise PeerError(f'lost the other processes in a collective ({first}); the error of the one '
                        f'that failed, if any, is above') from None


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


rank = util.rank  # torch.distributed's rank once joined, else torchrun's RANK, else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True in a process started by torchrun (or with its environment)."""
    return 'RANK' in os.environ and 'WORLD_SIZE' in os.environ


def start(device: torch.device) -> torch.device:
    """Join the process group when launched by torchrun: NCCL on CUDA (one GPU per local rank),
    gloo on the CPU. -> the device this process uses."""
    if not launched() or dist.is_initialized():
        return device
    if device.type == 'cuda':
        index = int(os.environ.get('LOCAL_RANK', 0))
        if index >= torch.cuda.device_count():
            raise ValueError(f'local rank {index}: this machine has {torch.cuda.device_count()} CUDA device(s); '
                             f'start at most that many processes per node')
        device = torch.device('cuda', index)
        torch.cuda.set_device(device)
    elif device.type != 'cpu':
        raise ValueError(f'--device {device}: several processes run on CUDA or on the CPU')
    env = os.environ.get('CASC_DIST_TIMEOUT', str(TIMEOUT_SECONDS))
    try:
        seconds = float(env)
    except ValueError:
        seconds = math.nan
    if not seconds > 0:
        raise ValueError(f'CASC_DIST_TIMEOUT={env!r}: expected a number of seconds > 0')
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                            timeout=datetime.timedelta(seconds=seconds),
                            device_id=device if device.type == 'cuda' else None)
    return device


def error_line(e: Exception) -> str:
    """An error's one line, naming this process's rank when there are several; under torchrun also
    left where the launcher looks for it (TORCHELASTIC_ERROR_FILE), so that its failure report names
    the error instead of pointing to its docs."""
    message = f'rank {rank()}: {e}' if world() > 1 else str(e)
    _record_error(f'error: {message}')
    return message


def _record_error(message: str):
    path = os.environ.get('TORCHELASTIC_ERROR_FILE')
    if path and not os.path.exists(path):
        with open(path, 'w', encoding='utf-8') as f:
            json.dump({'message': {'message': message, 'extraInfo': {'py_callstack': message,
                                                                       'timestamp': str(int(time.time()))}}}, f)


def stop(finished: bool = False):
    """Leave the process group (a no-op when none was joined or it was left already). A run that
    finished first waits at a barrier, so that no process tears gloo down and exits while another
    still works (writes its checkpoint): a rank that left early once aborted at exit in CI
    ("terminate called without an active exception", torch 2.14.1 on 2 loaded cores; not reproduced
    here in 42 runs, 27 of them under load). A failing run leaves at once: its peers see the
    connection close and fail in turn."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def shares(n: int, parts: int) -> list:
    """Sizes of n items split into `parts` contiguous shares as evenly as possible (the first
    n % parts shares one larger)."""
    return [n // parts + (p < n % parts) for p in range(parts)]


def share(n: int, parts: int, part: int) -> slice:
    """Share number `part` of n items split as `shares` does."""
    sizes = shares(n, parts)
    start = sum(sizes[:part])
    return slice(start, start + sizes[part])


class GlobalBatchSampler(Sampler):
    """This process's share of every global batch: epoch e's permutation of n items is
    randperm(n) seeded with seed + e (call set_epoch), cut into global batches of batch_size
    (the last one smaller), each split into world contiguous shares."""

    def __init__(self, n: int, batch_size: int, seed: int, rank_: int = 0, world_: int = 1):
        if batch_size % world_:
            raise ValueError(f'--batch_size {batch_size}: not divisible by the {world_} processes '
                             f'(each takes batch_size / {world_} pairs of every global batch)')
        if 0 < n % batch_size < world_:
            raise ValueError(f'--batch_size {batch_size}: the last global batch of the {n} training pairs '
                             f'has {n % batch_size}, fewer than the {world_} processes; choose another batch size')
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank_, world_
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for batch in perm.split(self.batch_size):
            yield batch[share(len(batch), self.world, self.rank)].tolist()


def _sizes(x: Tensor) -> Tensor:
    """(world, x.dim()) shapes of x on every process."""
    shape = torch.tensor(x.shape, device=x.device)
    out = [torch.empty_like(shape) for _ in range(world())]
    with _collective():
        dist.all_gather(out, shape)
    return torch.stack(out).cpu()


class _GatherCat(torch.autograd.Function):
    """Concatenate every process's x (n_p, ...) along dim 0; other dims are zero-padded to the
    largest. Backward: the gradients of every process's copy are summed (all_reduce) and each
    process keeps the rows of its own x."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        shapes = _sizes(x)
        top = shapes.amax(0).tolist()
        pad = []  # F.pad order: last dim first
        for have, want in zip(reversed(x.shape), reversed(top)):
            pad += [0, want - have]
        padded = torch.nn.functional.pad(x, pad).contiguous()
        parts = [torch.empty_like(padded) for _ in range(world())]
        with _collective():
            dist.all_gather(parts, padded)
        rows = shapes[:, 0].tolist()
        ctx.start, ctx.shape = sum(rows[:rank()]), x.shape
        return torch.cat([p[:n] for p, n in zip(parts, rows)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        with _collective():
            dist.all_reduce(grad)
        own = grad[ctx.start:ctx.start + ctx.shape[0]]
        return own[tuple(slice(0, n) for n in ctx.shape)]


class Gather:
    """gather(x): every process's x (n_p, ...) concatenated in rank order, (sum n_p, ...),
    differentiable for float tensors; `offset` is this process's first row in the result and
    `total` the rows of all (the global batch size)."""

    def __init__(self, n_local: int, device):
        rows = _sizes(torch.empty(n_local, device=device))[:, 0].tolist()
        self.offset, self.total = sum(rows[:rank()]), sum(rows)

    def __call__(self, x: Tensor) -> Tensor:
        if x.dtype == torch.bool:
            return _GatherCat.apply(x.to(torch.uint8)).bool()
        if x.requires_grad:
            return _GatherCat.apply(x)
        with torch.no_grad():
            return _GatherCat.apply(x)


def deal(sizes: list, parts: int = None, part: int = None) -> list:
    """Indices of the work items (of these sizes, in order) that process `part` of `parts` (default:
    this one) does: contiguous runs of about sum(sizes) / parts each, item k going to the process
    whose share of the total holds its midpoint, so no share is off by more than half an item's size
    at either end."""
    parts, part = world() if parts is None else parts, rank() if part is None else part
    total, start, mine = max(1, sum(sizes)), 0, []
    for k, size in enumerate(sizes):
        if (2 * start + size) * parts // (2 * total) == part:
            mine.append(k)
        start += size
    return mine


def sum_to_main(t: Tensor, device) -> Tensor:
    """Sum the CPU tensor t over all processes into rank 0's copy (other ranks' are left as
    partial sums), through `device` (NCCL reduces CUDA tensors only). Sums of one number and
    zeros are exact."""
    if world() == 1:
        return t
    with _collective():
        if dist.get_backend() == 'nccl':
            on_device = t.to(device)
            dist.reduce(on_device, 0)
            return on_device.cpu()
        dist.reduce(t, 0)
    return t


def broadcast(value):
    """Rank 0's picklable value, on every process."""
    if world() == 1:
        return value
    box = [value]
    with _collective():
        dist.broadcast_object_list(box, 0)
    return box[0]


def same_weights(module: torch.nn.Module):
    """Every process starts from rank 0's parameters and buffers."""
    if world() > 1:
        with _collective():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, 0)


def average_gradients(params: list):
    """Average the gradients over the processes, in one flat all_reduce (in place). With the
    gathers of CASC.forward, each process's gradient holds its share of N copies of the loss's
    gradient, so the average is the single-process gradient of the global batch."""
    grads = [p.grad for p in params if p.grad is not None]
    if world() == 1 or not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    with _collective():
        dist.all_reduce(flat)
    flat /= world()
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))
