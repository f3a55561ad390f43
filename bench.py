"""Benchmark the CASC engine against the authors' algorithm (reference.py) at the paper's sizes.

    python bench.py [--device cpu|cuda] [--precision fp32|tf32|bf16] [--n_img 1000 --n_cap 5000] [--skip_train]
    python bench.py --search [--n_img 1000]     # search.py's text queries/s over --n_img images
    python bench.py --serve [--n_img 1000] [--serve_caps 5]   # search.py --serve: time to ready, latency, queries/s

Random weights and inputs, seeded; caption lengths drawn like the real Flickr30K test captions' (their
deciles are built in; the development checkout reads the captions themselves). The authors'
evaluation loops over captions: it scores --ref_caps of them, extrapolated linearly.
Each side's training step (forward + backward) runs in a fresh process, so that its peak memory is its own.
"""
import dataclasses
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from statistics import median_high

import util  # first: it makes a Ctrl-C during the slow imports below one line
util.quiet_ctrl_c(__name__)

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

import engine
import fused
import reference
import scoring
import search
from data import pad_captions
from encode import encode_captions, encode_images
from engine import PRECISIONS, Side
from model import CASC, Config
from vocab import read_captions, tokenize

CAPS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'shared', 'data', 'f30k_precomp',
                    'test_caps.txt')
FALLBACK_LENS = (9, 11, 12, 13, 14, 15, 16, 18, 20, 26)  # deciles of the real F30K test lengths
R, IMG_DIM, VOCAB = 36, 2048, 8481


def parse_args(argv=None):
    p = util.parser(__doc__)
    p.add_argument('--device', help='cpu | cuda | cuda:N | mps (default: cuda, else mps, else cpu)')
    p.add_argument('--precision', default='fp32', choices=PRECISIONS, help='of the region-word product')
    p.add_argument('--n_img', type=util.positive_int, default=1000, help='images of the evaluation (or --search)')
    p.add_argument('--n_cap', type=util.positive_int, default=5000, help='captions of the evaluation')
    p.add_argument('--ref_caps', type=util.positive_int, default=20, help="captions scored by the authors' loop")
    p.add_argument('--batch_size', type=util.positive_int, default=128, help='pairs of the timed training step')
    p.add_argument('--train_steps', type=util.positive_int, default=3, help='timed engine steps (reference: 1 on CPU)')
    p.add_argument('--eval_memory_gb', type=util.positive_float, default=2.0, help='memory budget of one chunk, in GB')
    p.add_argument('--seed', type=int, default=0, help='seeds the random inputs and weights')
    p.add_argument('--skip_train', action='store_true', help='time the evaluation only')
    p.add_argument('--search', action='store_true', help="time search.py's text queries over --n_img images only")
    p.add_argument('--serve', action='store_true', help='time search.py --serve over --n_img random images: time to '
                   'ready with and without a built index, latency and queries/s at 1, 8 and 32 clients')
    p.add_argument('--serve_caps', type=util.positive_int, default=5, help='--serve: captions per image (1 or 5)')
    return p.parse_args(argv)


def timed(fn, device, n: int = 1, burn_in=None, max_s: float = float('inf')) -> tuple:
    """burn_in() if given, then fn() n times (fewer once they took max_s) -> (its last result, [wall seconds
    of each call, until the device has finished its queued work])."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    if burn_in:
        burn_in()
    times = []
    while len(times) < n and sum(times) < max_s:
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return out, times


def memory_mb(device, peak: bool = False, reset: bool = False) -> float:
    """This process's memory now, or its peak since the last reset (CUDA allocator, or resident set)."""
    if device.type == 'cuda':
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2 ** 20
    if reset:  # VmHWM restarts from now (ru_maxrss would keep the parent's peak: it survives fork + exec)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    with open('/proc/self/status') as f:
        return int(dict(ln.split(':', 1) for ln in f)['VmHWM' if peak else 'VmRSS'].split()[0]) / 1024


def random_captions(pool: list, n: int, gen, lens=None) -> list:
    """n random captions (word ids between <start> 1 and <end> 2), lengths drawn from pool (or lens)."""
    lens = lens or [pool[k] for k in torch.randint(len(pool), (n,), generator=gen).tolist()]
    return [[1] + torch.randint(4, VOCAB, (m - 2,), generator=gen).tolist() + [2] for m in lens]


def images(n: int, gen) -> torch.Tensor:
    return torch.randn(n, R, IMG_DIM, generator=gen).relu_()  # (n, R, IMG_DIM), non-negative as bottom-up features


def bench_eval(args, model: CASC, pool: list, device) -> tuple:
    """All n_img x n_cap scores by the engine beside --ref_caps captions of them by the authors' loop
    -> (encoded images, caption batches, the engine's seconds)."""
    gen, lens = torch.Generator().manual_seed(args.seed), [pool[k % len(pool)] for k in range(args.n_cap)]
    img = encode_images(model, images(args.n_img, gen).numpy(), device=device)
    caps = encode_captions(model, random_captions(pool, args.n_cap, gen, lens), device=device)
    engine = partial(scoring.compute_sims, model, img, memory_gb=args.eval_memory_gb, precision=args.precision,
                     progress=False)
    engine([(torch.arange(len(caps[0][0])), caps[0][1])])  # burn-in on the first caption batch
    before = memory_mb(device, reset=True)
    sims, (t_eng,) = timed(lambda: engine(caps), device)  # (n_img, n_cap)
    peak = memory_mb(device, peak=True) - before
    n_ref = min(args.ref_caps, args.n_cap)  # the first n_ref captions, wherever their batches put them
    words = {int(k): cap.emb[row, :lens[k]] for idx, cap in caps for row, k in enumerate(idx) if k < n_ref}
    cap_emb, cap_lens = pad_sequence([words[j] for j in range(n_ref)], True), torch.tensor(lens[:n_ref])
    with torch.inference_mode():  # the same Config, weights and encoded inputs as the engine
        authors = partial(reference.casc_scores, img.emb, cfg=model.cfg, head=model.head)
        ref, (t_ref,) = timed(lambda: authors(cap_emb, cap_lens), device,
                              burn_in=lambda: authors(cap_emb[:1], cap_lens[:1]))
    diff = (ref['s'].float().cpu() - sims[:, :n_ref]).abs().max().item()
    n_pairs, n_all, t_all = args.n_img * n_ref, args.n_img * args.n_cap, t_ref * args.n_cap / n_ref
    print(f'engine: {n_all:,} pairs in {t_eng:.1f} s = {n_all / t_eng:,.0f} pairs/s; peak memory while scoring '
          f'+{peak:.0f} MB, of which the float32 score matrix is {sims.numel() * 4 / 2 ** 20:.0f} MB '
          f'(whole process, encoded split and inputs included: {memory_mb(device, peak=True):.0f} MB)')
    target = {'bf16': 25}.get(args.precision, 15)  # x the authors' loop on the CPU (bf16: with AVX-512 BF16)
    print(f"authors' algorithm: {n_pairs:,} pairs in {t_ref:.1f} s = {n_pairs / t_ref:,.0f} pairs/s, "
          f"extrapolated: {t_all:.0f} s for all {n_all:,} pairs (authors' / engine: {t_all / t_eng:.1f}x; CPU "
          f"target >= {target}x: {'met' if t_all / t_eng >= target else 'NOT met'})")
    print(f'max |engine - reference| over those {n_pairs:,} scores: {diff:.2e} (target < 1e-5 in fp32)')
    return img, caps, t_eng


def bench_product(args, img: Side, caps: list, t_eval: float, device, cfg: Config):
    """The region-word product alone at compute_sims's chunk shapes (scoring.plan_chunks), as the
    engine computes it (engine.region_word_product: rows padded on the CPU), vs a plain matmul."""
    chunks = [(i1 - i0, cap) for idx, cap in caps for i0, i1 in
              scoring.plan_chunks(args.n_img, len(idx), R, cap.mask.size(1), cfg, device, args.eval_memory_gb)]
    dtype, d = (torch.bfloat16 if args.precision == 'bf16' else torch.float32), img.emb.size(-1)

    def product(n_i: int, cap: Side) -> float:
        a, b = img.emb[:n_i].reshape(-1, d), cap.emb.reshape(-1, d)
        with torch.inference_mode():  # (n_i * R, n_c * L)
            return timed(lambda: engine.region_word_product(a, b, args.precision, engine.GEMM_LANES), device)[1][0]
    product(*chunks[0])  # burn-in
    seconds, flops = sum(product(*c) for c in chunks), sum(2 * n_i * R * cap.mask.numel() * d for n_i, cap in chunks)
    x = torch.randn(4096, 4096, device=device)

    def matmul_gflops(y: Tensor) -> float:  # y @ y, best of 3
        return 2 * y.size(0) ** 3 / min(timed(lambda: y @ y, device, 3, burn_in=lambda: y @ y)[1]) / 1e9
    peak32 = peak = matmul_gflops(x)
    y = x
    if dtype != torch.float32:  # a CPU without bf16 products takes minutes on 4096^3: 1024^3 gives its speed
        y = x[:1024, :1024].to(dtype)
        peak = matmul_gflops(y)
        if peak >= 10:
            y = x.to(dtype)
            peak = matmul_gflops(y)
    gflops, n_pairs = flops / seconds / 1e9, sum(n_i * cap.emb.size(0) for n_i, cap in chunks)
    print(f'dominant product: {gflops:.0f} GFLOP/s = {100 * gflops / peak:.0f}% of torch.matmul ({peak:.0f} '
          f'GFLOP/s, {y.size(0)}^3 {dtype}); it takes {seconds:.1f} s = {100 * seconds / t_eval:.0f}% of the '
          f'evaluation ({len(chunks)} chunks, {flops / 1e12:.2f} TFLOP)')
    w2 = 4 * n_pairs * cfg.label_hidden * cfg.num_labels  # the head's W2 on u_img and u_txt of every pair
    t_floor = (flops + w2) / peak32 / 1e9  # the two products that no exact algorithm avoids, at matmul speed
    print(f'(label head W2 on every pair: another {w2 / 1e12:.2f} TFLOP); fp32 FLOP floor: these '
          f'{(flops + w2) / 1e12:.2f} TFLOP at {peak32:.0f} GFLOP/s = {t_floor:.1f} s, the evaluation ran at '
          f'{100 * t_floor / t_eval:.0f}% of the floor')


def bench_search(args, model: CASC, pool: list, device):
    """Text queries/s of search.top_images (query encoding included, top 10) over --n_img random images."""
    gen = torch.Generator().manual_seed(args.seed)
    parts = [encode_images(model, images(min(1000, args.n_img - i0), gen).numpy(), device=device)
             for i0 in range(0, args.n_img, 1000)]  # 1,000 at a time: 10,000 raw images are 2.9 GB
    img = Side(*(None if p[0] is None else torch.cat(p) for p in zip(*parts)))

    def top10(queries: list):  # as search.Searcher.text does
        caps = encode_captions(model, queries, search.QUERY_BATCH, device)
        return search.top_images(model, img, caps, 10, precision=args.precision, memory_gb=args.eval_memory_gb)
    for n_q in (1, 100):
        queries = random_captions(pool, n_q, gen)
        _, times = timed(lambda: top10(queries), device, 3, burn_in=lambda: top10(queries[:1]), max_s=10)
        t = median_high(times)
        print(f'search, {n_q} text quer{"y" if n_q == 1 else "ies"} per call over {args.n_img:,} images: {t:.3f} s '
              f'per call = {n_q / t:,.1f} queries/s (median of {len(times)}; {memory_mb(device):.0f} MB in use)')
        if n_q == 1:
            print(f'  one query over 100,000 images, extrapolated linearly: {t * 100_000 / args.n_img:.1f} s')


def serve_gallery(args, model: CASC, pool: list, folder: str) -> str:
    """A random split of --n_img images (--serve_caps captions each, real lengths, words w0, w1, ...)
    and a checkpoint of model's random weights in folder -> the checkpoint's path."""
    gen, data = torch.Generator().manual_seed(args.seed), os.path.join(folder, 'bench_precomp')
    os.makedirs(data)
    ims = np.lib.format.open_memmap(os.path.join(data, 'test_ims.npy'), 'w+', np.float32, (args.n_img, R, IMG_DIM))
    for i0 in range(0, args.n_img, 1000):  # 1,000 at a time: 10,000 images are 2.9 GB
        ims[i0:i0 + 1000] = images(min(1000, args.n_img - i0), gen).numpy()
    ims.flush()
    words = ['<pad>', '<start>', '<end>', '<unk>'] + [f'w{k}' for k in range(VOCAB - 4)]
    with open(os.path.join(data, 'test_caps.txt'), 'w') as f:
        f.writelines(' '.join(words[t] for t in cap[1:-1]) + '\n'
                     for cap in random_captions(pool, args.n_img * args.serve_caps, gen))
    path = os.path.join(folder, 'random.pth.tar')
    opt = {**dataclasses.asdict(model.cfg), 'data_name': 'bench_precomp', 'data_path': folder}
    torch.save({'model': model.state_dict(), 'opt': opt, 'vocab': words}, path)
    return path


def bench_serve(args, model: CASC, pool: list):
    """search.py --serve on a random gallery: seconds until it prints its URL (building the index, then
    with it built), then per number of clients (each asking one random text query after another, top
    10) the latency p50/p95 and the queries/s."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import quote
    from urllib.request import urlopen
    folder = tempfile.mkdtemp(prefix='casc-bench-serve-')
    ckpt, gen = serve_gallery(args, model, pool, folder), torch.Generator().manual_seed(args.seed + 1)
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'search.py'), '--serve',
           '--model_path', ckpt, '--port', '0', '--device', args.device or 'cpu', '--precision', args.precision]
    for label in ('building the index', 'index built'):
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        url = proc.stdout.readline().split('at ', 1)[1].split()[0]
        print(f'serve, {args.n_img:,} images x {args.serve_caps} captions: ready in {time.perf_counter() - t0:.1f} '
              f's ({label})', flush=True)
        if label == 'building the index':
            proc.send_signal(signal.SIGINT), proc.wait(300)
    texts = [' '.join(f'w{t}' for t in cap[1:-1]) for cap in random_captions(pool, 2000, gen)]

    def ask(k: int) -> float:
        t0 = time.perf_counter()
        with urlopen(f'{url}api/search?q={quote(texts[k % len(texts)])}&k=10', timeout=600) as r:
            r.read()
        return time.perf_counter() - t0
    ask(0)  # burn-in
    for clients in (1, 8, 32):
        n = max(8, 2 * clients)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as workers:
            lat = sorted(workers.map(ask, range(1, n + 1)))
        wall = time.perf_counter() - t0
        print(f'serve, {clients} client(s), {n} queries over {args.n_img:,} images: latency p50 {lat[len(lat) // 2]:.3f} '
              f's, p95 {lat[min(n - 1, int(0.95 * n))]:.3f} s; {n / wall:.2f} queries/s', flush=True)
    proc.send_signal(signal.SIGINT), proc.wait(300)
    shutil.rmtree(folder, ignore_errors=True)


def train_side(engine: bool, args, pool: list, device) -> tuple:
    """One side's training steps (in a fresh process) -> (loss, [seconds per step], peak MB above the inputs)."""
    util.set_precision(args.precision)
    torch.manual_seed(args.seed)  # the same weights for both sides
    gen = torch.Generator().manual_seed(args.seed)
    model = CASC(Config(vocab_size=VOCAB)).to(device).train()
    B, K = args.batch_size, model.cfg.num_labels
    caps, lens = pad_captions(random_captions(pool, B, gen))  # (B, L), (B,)
    ims = images(B, gen)
    targets = (torch.rand(B, K, generator=gen) < 0.02).float()  # ~10 labels per image
    pos_weight = 1 + 99 * torch.rand(K, generator=gen)
    ims, caps, lens, targets, pos_weight = (t.to(device) for t in (ims, caps, lens, targets, pos_weight))
    before = memory_mb(device, reset=True)

    def step() -> float:
        loss = (model(ims, caps, lens, targets, pos_weight).loss if engine  # the authors' way: all B x B contexts
                else reference.train_loss(model.img_enc(ims), model.txt_enc(caps, lens), lens, targets, model.cfg,
                                          model.head, pos_weight))
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()
    loss, times = timed(step, device, args.train_steps if engine or device.type == 'cuda' else 1, burn_in=step)
    return loss, times, memory_mb(device, peak=True) - before


def bench_train(args, pool: list, device):
    """The training step of both sides, each in a fresh process (so that its peak memory is its own)."""
    res = []
    for name in ('engine', 'reference'):
        with ProcessPoolExecutor(1, mp_context=get_context('spawn')) as worker:
            res.append(worker.submit(train_side, name == 'engine', args, pool, device).result())
        loss, times, peak = res[-1]
        print(f'train step B={args.batch_size}, {name}: best {min(times):.2f} s ({args.batch_size / min(times):.0f} '
              f'pairs/s), median {median_high(times):.2f} s of {len(times)}; peak memory +{peak:.0f} MB; '
              f'loss {loss:.6f}')
    (eng_loss, eng_times, eng_peak), (ref_loss, ref_times, ref_peak) = res
    print(f'reference / engine: time {min(ref_times) / min(eng_times):.1f}x, peak memory {ref_peak / eng_peak:.1f}x; '
          f'|loss difference|: {abs(ref_loss - eng_loss):.2e}')


def main(argv=None):
    args = parse_args(argv)
    with util.one_line_errors():
        device = util.pick_device(args.device)
        util.set_precision(args.precision)
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
    else:
        with open('/proc/cpuinfo') as f:
            name = next((ln.split(':')[1].strip() for ln in f if ln.startswith('model name')), platform.processor())
    print(f'machine: {name} ({platform.machine()}), {torch.get_num_threads()} threads, {os.cpu_count()} CPUs '
          f'(load average {os.getloadavg()[0]:.1f}), torch {torch.__version__}, device {device}, {args.precision}')
    if device.type == 'cpu':
        with open('/proc/cpuinfo') as f:
            flags = next((ln for ln in f if ln.startswith('flags')), '').split()
        t0 = time.perf_counter()
        kernel = fused.library()  # built on first use (cached in ~/.cache/casc), then only loaded
        print(f"CPU: AVX-512 BF16 {'yes' if {'avx512_bf16', 'amx_bf16'} & set(flags) else 'no (bf16 products are slow)'}"
              f"; fused kernel {'ready' if kernel else 'UNAVAILABLE (eager scoring)'} in "
              f'{time.perf_counter() - t0:.1f} s')
    if os.path.isfile(CAPS):  # caption lengths (tokens + <start>, <end>) to draw from
        pool, source = [len(tokenize(c)) + 2 for c in read_captions(CAPS)], 'the real Flickr30K test captions'
    else:
        pool, source = list(FALLBACK_LENS), f'a FIXED distribution (deciles {FALLBACK_LENS}) since {CAPS} is absent'
    print(f'caption lengths from {source}: mean {sum(pool) / len(pool):.1f}, max {max(pool)}')
    torch.manual_seed(args.seed)
    model = CASC(Config(vocab_size=VOCAB)).to(device).eval()  # Config's defaults: the paper's settings
    if args.serve:
        bench_serve(args, model, pool)
    elif args.search:
        bench_search(args, model, pool, device)
    else:
        img, caps, t_eval = bench_eval(args, model, pool, device)
        bench_product(args, img, caps, t_eval, device, model.cfg)
        if not args.skip_train:
            bench_train(args, pool, device)
    print(f'load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other jobs slow every timing)')


if __name__ == '__main__':
    main()
