"""Benchmark the CASC engine against the authors' algorithm (reference.py) at the paper's sizes.

    python bench.py [--device cpu|cuda] [--n_img 1000] [--n_cap 5000] [--ref_caps 20] [--skip_train]
    python bench.py --search [--n_img 1000]     # search.py's text queries/s over --n_img images

Evaluation: all n_img x n_cap scores (by default the full Flickr30K test matrix, 5M pairs) with
evaluation.compute_sims, beside the authors' per-caption loop on --ref_caps captions, extrapolated
linearly (it loops over captions). Training: forward + backward of the loss at batch 128, each side
in a fresh subprocess so that its peak memory is its own. Random weights and inputs, seeded; the
caption lengths are those of the real Flickr30K test captions when ../shared holds them.
--search times search.top_images instead (query encoding included, top 10 kept), 1 and 100 queries
per call, and extrapolates one query's time linearly to a gallery of 100,000 images.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
from torch.nn.utils.rnn import pad_sequence

import evaluation
import reference
import search
import util
from model import CASC, Config, Side
from vocab import read_captions, tokenize

ROOT = os.path.dirname(os.path.abspath(__file__))
CAPS = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'f30k_precomp', 'test_caps.txt')
FALLBACK_LENS = (9, 11, 12, 13, 14, 15, 16, 18, 20, 26)  # deciles of the real F30K test lengths
R, IMG_DIM, VOCAB = 36, 2048, 8481


def parse_args(argv=None):
    p = util.parser(__doc__)
    p.add_argument('--device', help='cpu | cuda | cuda:N | mps (default: cuda, else mps, else cpu)')
    p.add_argument('--n_img', type=util.positive_int, default=1000, help='images of the evaluation benchmark')
    p.add_argument('--n_cap', type=util.positive_int, default=5000, help='captions of the evaluation benchmark')
    p.add_argument('--ref_caps', type=util.positive_int, default=20, help="captions scored by the authors' loop")
    p.add_argument('--skip_train', action='store_true', help='time the evaluation only')
    p.add_argument('--search', action='store_true', help='time search.py\'s text queries over --n_img images only')
    p.add_argument('--batch_size', type=util.positive_int, default=128, help='pairs of the timed training step')
    p.add_argument('--train_steps', type=util.positive_int, default=3, help='timed engine steps (reference: 1 on CPU)')
    p.add_argument('--precision', default='fp32', choices=('fp32', 'tf32', 'bf16'), help='of the region-word product')
    p.add_argument('--eval_memory_gb', type=util.positive_float, default=2.0, help='memory budget of one chunk, in GB')
    p.add_argument('--seed', type=int, default=0, help='seeds the random inputs and weights')
    p.add_argument('--_train_worker', choices=('engine', 'reference'), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def timed(fn, device) -> tuple:
    """fn() -> (its result, wall seconds until the device has finished its queued work)."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def memory_mb(device, peak: bool = False, reset: bool = False) -> float:
    """This process's memory now, or its peak since the last reset (CUDA allocator, or resident set)."""
    if device.type == 'cuda':
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2 ** 20
    if reset:  # VmHWM restarts from now (ru_maxrss may still hold the parent's peak: vfork + exec keeps it)
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


def bench_eval(args, model: CASC, pool: list, device) -> list:
    """Time all-pairs scoring (engine: all pairs; reference: --ref_caps captions) -> table rows."""
    gen, lens = torch.Generator().manual_seed(args.seed), [pool[k % len(pool)] for k in range(args.n_cap)]
    img = evaluation.encode_images(model, images(args.n_img, gen).numpy(), device=device)
    caps = evaluation.encode_captions(model, random_captions(pool, args.n_cap, gen, lens), device=device)
    run = lambda c: lambda: evaluation.compute_sims(model, img, c, args.eval_memory_gb,  # noqa: E731
                                                    precision=args.precision, progress=False)
    run([(torch.arange(len(caps[0][0])), caps[0][1])])()  # burn-in on the first caption batch
    before = memory_mb(device, reset=True)
    sims, t_eng = timed(run(caps), device)  # (n_img, n_cap)
    peak = memory_mb(device, peak=True) - before
    where = {int(k): (cap, row) for idx, cap in caps for row, k in enumerate(idx)}  # caption -> its encoding
    cap_emb = pad_sequence([where[j][0].emb[where[j][1], :lens[j]] for j in range(args.ref_caps)], True)
    cap_lens = torch.tensor(lens[:args.ref_caps])
    with torch.inference_mode():  # the same Config, weights and encoded inputs as the engine
        reference.casc_scores(img.emb, cap_emb[:1], cap_lens[:1], model.cfg, model.head)  # burn-in
        ref, t_ref = timed(lambda: reference.casc_scores(img.emb, cap_emb, cap_lens, model.cfg, model.head), device)
    diff = (ref['s'].float().cpu() - sims[:, :args.ref_caps]).abs().max().item()
    n_ref, n_all, t_proj = args.n_img * args.ref_caps, args.n_img * args.n_cap, t_ref * args.n_cap / args.ref_caps
    print(f'engine: {n_all:,} pairs in {t_eng:.1f} s = {n_all / t_eng:,.0f} pairs/s; peak memory while scoring '
          f'+{peak:.0f} MB, of which the float32 score matrix is {sims.numel() * 4 / 2 ** 20:.0f} MB '
          f'(whole process, encoded split and inputs included: {memory_mb(device, peak=True):.0f} MB)')
    print(f"authors' algorithm: {n_ref:,} pairs in {t_ref:.1f} s = {n_ref / t_ref:,.0f} pairs/s, "
          f'extrapolated: {t_proj:.0f} s for all {n_all:,} pairs')
    print(f'max |engine - reference| over those {n_ref:,} scores: {diff:.2e} (target < 1e-5 in fp32)')
    matmul_share(args, img, caps, t_eng, device, model.cfg)
    return [("eval pairs/s (authors' extrapolated)", n_ref / t_ref, n_all / t_eng, t_proj / t_eng),
            (f"eval s, {args.n_img} x {args.n_cap} (authors' projected)", t_proj, t_eng, t_proj / t_eng),
            ('eval max |score diff| (fp32 target < 1e-5)', None, diff, None)]




def matmul_share(args, img: Side, caps: list, t_eval: float, device, cfg: Config):
    """The region-word product alone at the chunk shapes of compute_sims (evaluation.plan_chunks's),
    vs a large plain matmul."""
    chunks = [(i1 - i0, cap) for _, cap in caps
              for i0, i1 in evaluation.plan_chunks(args.n_img, *cap.mask.shape, R, cfg, device, args.eval_memory_gb)]
    dtype, d = (torch.bfloat16 if args.precision == 'bf16' else torch.float32), img.emb.size(-1)

    def product(n_i: int, cap: Side) -> float:
        a, b = img.emb[:n_i].reshape(-1, d).to(dtype), cap.emb.reshape(-1, d).to(dtype)
        return timed(lambda: a @ b.T, device)[1]  # (n_i * R, n_c * L)
    product(*chunks[0])  # burn-in
    seconds, flops = sum(product(*c) for c in chunks), sum(2 * n_i * R * cap.mask.numel() * d for n_i, cap in chunks)
    x = torch.randn(4096, 4096, device=device, dtype=dtype)
    peak = 2 * 4096 ** 3 / min([timed(lambda: x @ x, device)[1] for _ in range(4)][1:]) / 1e9  # the first: burn-in
    gflops = flops / seconds / 1e9
    print(f'dominant product: {gflops:.0f} GFLOP/s = {100 * gflops / peak:.0f}% of torch.matmul ({peak:.0f} '
          f'GFLOP/s, 4096^3 {dtype}); it takes {seconds:.1f} s = {100 * seconds / t_eval:.0f}% of the '
          f'evaluation ({len(chunks)} chunks, {flops / 1e12:.2f} TFLOP)')
    n_pairs = sum(n_i * cap.emb.size(0) for n_i, cap in chunks)  # the label head's W2 runs on u_img, u_txt of each
    print(f'(label head W2 on every pair: another {4 * n_pairs * cfg.label_hidden * cfg.num_labels / 1e12:.2f} TFLOP)')


def bench_search(args, model: CASC, pool: list, device):
    """Text queries/s of search.top_images over --n_img random images, 1 and 100 queries per call."""
    gen = torch.Generator().manual_seed(args.seed)
    parts = [evaluation.encode_images(model, images(min(1000, args.n_img - i0), gen).numpy(), device=device)
             for i0 in range(0, args.n_img, 1000)]  # 1,000 at a time: 10,000 raw images are 2.9 GB
    img = Side(*(None if p[0] is None else torch.cat(p) for p in zip(*parts)))
    for n_q in (1, 100):
        queries, times = random_captions(pool, n_q, gen), []
        run = lambda qs: lambda: search.top_images(  # noqa: E731  (as search.Searcher.text does)
            model, img, evaluation.encode_captions(model, qs, search.QUERY_BATCH, device), 10,
            precision=args.precision, memory_gb=args.eval_memory_gb)
        run(queries[:1])()  # burn-in
        while len(times) < 3 and sum(times) < 10:
            times.append(timed(run(queries), device)[1])
        t = sorted(times)[len(times) // 2]
        print(f'search, {n_q} text quer{"y" if n_q == 1 else "ies"} per call over {args.n_img:,} images: {t:.3f} s '
              f'per call = {n_q / t:,.1f} queries/s (median of {len(times)}; {memory_mb(device):.0f} MB in use)')
        if n_q == 1:
            print(f'  one query over 100,000 images, extrapolated linearly: {t * 100_000 / args.n_img:.1f} s')


def train_worker(args, pool: list, device):
    """One side's training steps in this fresh process; prints {times, peak_mb, loss} as JSON."""
    torch.manual_seed(args.seed)  # the same weights in both workers
    gen = torch.Generator().manual_seed(args.seed)
    model = CASC(Config(vocab_size=VOCAB)).to(device).train()
    B, K = args.batch_size, model.cfg.num_labels
    captions = [torch.tensor(c) for c in random_captions(pool, B, gen)]
    ims = images(B, gen)
    targets = (torch.rand(B, K, generator=gen) < 0.02).float()  # ~10 labels per image
    ims, caps, lens, targets, pos_weight = (t.to(device) for t in (
        ims, pad_sequence(captions, True), torch.tensor([len(c) for c in captions]), targets,
        1 + 99 * torch.rand(K, generator=gen)))
    engine, before = args._train_worker == 'engine', memory_mb(device, reset=True)

    def step() -> float:
        loss = (model(ims, caps, lens, targets, pos_weight).loss if engine  # the authors' way: all B x B contexts
                else reference.train_loss(model.img_enc(ims), model.txt_enc(caps, lens), lens, targets, model.cfg,
                                          model.head, pos_weight))
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()
    runs = [timed(step, device) for _ in range(1 + (args.train_steps if engine or device.type == 'cuda' else 1))]
    print(json.dumps({'times': [t for _, t in runs[1:]], 'peak_mb': memory_mb(device, peak=True) - before,
                      'loss': runs[-1][0]}))  # the first run: burn-in


def bench_train(argv: list, args) -> list:
    """Both training workers, each in a fresh process -> table rows."""
    res = {}
    for role in ('engine', 'reference'):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, '--_train_worker', role],
                             stdout=subprocess.PIPE, text=True, check=True).stdout
        res[role] = r = json.loads(out.strip().splitlines()[-1])
        print(f"train step B={args.batch_size}, {role}: best {min(r['times']):.2f} s, median "
              f"{sorted(r['times'])[len(r['times']) // 2]:.2f} s of {len(r['times'])}; peak memory "
              f"+{r['peak_mb']:.0f} MB; loss {r['loss']:.6f}")
    ref, eng = res['reference'], res['engine']
    print(f"|loss difference|: {abs(ref['loss'] - eng['loss']):.2e}")
    return [(f'train step s, B={args.batch_size} (best)', min(ref['times']), min(eng['times']),
             min(ref['times']) / min(eng['times'])),
            ('train peak memory, +MB', ref['peak_mb'], eng['peak_mb'], ref['peak_mb'] / eng['peak_mb']),
            ('train |loss diff|', None, abs(ref['loss'] - eng['loss']), None)]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    with util.one_line_errors():
        device = util.pick_device(args.device)
        util.set_precision(args.precision)
    if os.path.isfile(CAPS):  # caption lengths (tokens + <start>, <end>) to draw from
        pool, source = [len(tokenize(c)) + 2 for c in read_captions(CAPS)], 'the real Flickr30K test captions'
    else:
        pool, source = list(FALLBACK_LENS), f'a FIXED distribution (deciles {FALLBACK_LENS}) since {CAPS} is absent'
    if args._train_worker:
        return train_worker(args, pool, device)
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
    else:
        with open('/proc/cpuinfo') as f:
            name = next((ln.split(':')[1].strip() for ln in f if ln.startswith('model name')), platform.processor())
    print(f'machine: {name} ({platform.machine()}), {torch.get_num_threads()} threads, {os.cpu_count()} CPUs '
          f'(load average {os.getloadavg()[0]:.1f}), torch {torch.__version__}, device {device}, {args.precision}')
    print(f'caption lengths from {source}: mean {sum(pool) / len(pool):.1f}, max {max(pool)}')
    torch.manual_seed(args.seed)
    model = CASC(Config(vocab_size=VOCAB)).to(device).eval()  # Config's defaults: the paper's settings
    if args.search:
        return bench_search(args, model, pool, device)
    rows = bench_eval(args, model, pool, device) + ([] if args.skip_train else bench_train(argv, args))
    fmt = lambda v, spec='.3g': '' if v is None else f'{v:{spec}}'  # noqa: E731
    table = [('metric', "authors' algorithm", 'engine', 'ratio')]
    table += [(m, fmt(r), fmt(e), fmt(q, '.1f') + 'x' * (q is not None)) for m, r, e, q in rows]
    widths = [max(len(row[k]) for row in table) for k in range(4)]
    for row in table:
        print(' | '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print(f'load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other jobs slow every timing)')


if __name__ == '__main__':
    main()
