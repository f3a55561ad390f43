"""Benchmark the CASC engine against the authors' algorithm (tests/reference.py) at the paper's sizes.

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
import search
import util
from model import CASC, Config, Side
from vocab import read_captions, tokenize

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
import reference  # noqa: E402  (the authors' algorithm as a slow loop; tests/ is no package)

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


def clock(device) -> float:
    """Wall time once the device has finished its queued work."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter()


def length_pool() -> tuple:
    """Caption lengths (tokens + <start>, <end>) to draw from -> (list, where they come from)."""
    if os.path.isfile(CAPS):
        return [len(tokenize(c)) + 2 for c in read_captions(CAPS)], 'the real Flickr30K test captions'
    return list(FALLBACK_LENS), f'a FIXED distribution (deciles {FALLBACK_LENS}) since {CAPS} is absent'


def random_captions(lens: list, gen) -> list:
    """Random word ids between <start> (1) and <end> (2), one list per length."""
    return [[1] + torch.randint(4, VOCAB, (n - 2,), generator=gen).tolist() + [2] for n in lens]


def head_params(model: CASC) -> tuple:
    return model.head.fc1.weight, model.head.fc1.bias, model.head.fc2.weight, model.head.fc2.bias


def bench_eval(args, model: CASC, pool: list, device) -> list:
    """Time all-pairs scoring (engine: all pairs; reference: --ref_caps captions) -> table rows."""
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.n_img, R, IMG_DIM, generator=gen).relu_()  # non-negative, as bottom-up features
    lens = [pool[k % len(pool)] for k in range(args.n_cap)]
    img = evaluation.encode_images(model, images.numpy(), device=device)
    caps = evaluation.encode_captions(model, random_captions(lens, gen), device=device)
    chunks = [(i1 - i0, cap) for _, cap in caps  # the (images, captions) chunks compute_sims scores
              for i0, i1 in evaluation.plan_chunks(args.n_img, *cap.mask.shape, R, model.cfg, device,
                                                   args.eval_memory_gb)]
    run = lambda c: evaluation.compute_sims(model, img, c, args.eval_memory_gb, precision=args.precision,
                                            progress=False)  # noqa: E731
    run([(torch.arange(len(caps[0][0])), caps[0][1])])  # burn-in on the first caption batch
    before = reset_peak(device)
    t0 = clock(device)
    sims = run(caps)  # (n_img, n_cap)
    t_eng = clock(device) - t0
    peak = memory_mb(device, peak=True) - before
    where = {int(k): (cap, row) for idx, cap in caps for row, k in enumerate(idx)}  # caption -> its encoding
    cap_emb = pad_sequence([where[j][0].emb[where[j][1], :lens[j]] for j in range(args.ref_caps)], True)
    cap_lens = torch.tensor(lens[:args.ref_caps])
    with torch.inference_mode():  # Config() defaults = reference defaults = the paper's settings
        reference.casc_scores(img.emb, cap_emb[:1], cap_lens[:1], head=head_params(model))  # burn-in
        t0 = clock(device)
        ref = reference.casc_scores(img.emb, cap_emb, cap_lens, head=head_params(model), alpha=model.cfg.alpha)
        t_ref = clock(device) - t0
    diff = (ref['s'].float().cpu() - sims[:, :args.ref_caps]).abs().max().item()
    n_ref, n_all, t_proj = args.n_img * args.ref_caps, args.n_img * args.n_cap, t_ref * args.n_cap / args.ref_caps
    print(f'engine: {n_all:,} pairs in {t_eng:.1f} s = {n_all / t_eng:,.0f} pairs/s; peak memory while scoring '
          f'+{peak:.0f} MB, of which the float32 score matrix is {sims.numel() * 4 / 2 ** 20:.0f} MB '
          f'(whole process, encoded split and inputs included: {memory_mb(device, peak=True):.0f} MB)')
    print(f"authors' algorithm: {n_ref:,} pairs in {t_ref:.1f} s = {n_ref / t_ref:,.0f} pairs/s, "
          f'extrapolated: {t_proj:.0f} s for all {n_all:,} pairs')
    print(f'max |engine - reference| over those {n_ref:,} scores: {diff:.2e} (target < 1e-5 in fp32)')
    matmul_share(args, img, chunks, t_eng, device, model.cfg)
    return [("eval pairs/s (authors' extrapolated)", n_ref / t_ref, n_all / t_eng, t_proj / t_eng),
            (f"eval s, {args.n_img} x {args.n_cap} (authors' projected)", t_proj, t_eng, t_proj / t_eng),
            ('eval max |score diff| (fp32 target < 1e-5)', None, diff, None)]


def matmul_share(args, img, chunks: list, t_eval: float, device, cfg: Config):
    """The region-word product alone at the evaluation's chunk shapes, vs a large plain matmul."""
    dtype, d = (torch.bfloat16 if args.precision == 'bf16' else torch.float32), img.emb.size(-1)
    seconds, flops = 0.0, 0
    for k, (n_i, cap) in enumerate(chunks[:1] + chunks):  # the first one twice: burn-in
        a, b = img.emb[:n_i].reshape(-1, d).to(dtype), cap.emb.reshape(-1, d).to(dtype)
        t0 = clock(device)
        a @ b.T  # (n_i * R, n_c * L)
        if k:
            seconds += clock(device) - t0
            flops += 2 * a.size(0) * b.size(0) * d
    x, times = torch.randn(4096, 4096, device=device, dtype=dtype), []
    for _ in range(4):  # the first is burn-in
        t0 = clock(device)
        x @ x
        times.append(clock(device) - t0)
    gflops, peak = flops / seconds / 1e9, 2 * 4096 ** 3 / min(times[1:]) / 1e9
    print(f'dominant product: {gflops:.0f} GFLOP/s = {100 * gflops / peak:.0f}% of torch.matmul ({peak:.0f} '
          f'GFLOP/s, 4096^3 {dtype}); it takes {seconds:.1f} s = {100 * seconds / t_eval:.0f}% of the '
          f'evaluation ({len(chunks)} chunks, {flops / 1e12:.2f} TFLOP)')
    n_pairs = sum(n_i * cap.emb.size(0) for n_i, cap in chunks)  # the label head's W2 runs on u_img, u_txt of each
    print(f'(label head W2 on every pair: another {4 * n_pairs * cfg.label_hidden * cfg.num_labels / 1e12:.2f} TFLOP)')


def bench_search(args, model: CASC, pool: list, device):
    """Text queries/s of search.top_images over --n_img random images, 1 and 100 queries per call."""
    gen = torch.Generator().manual_seed(args.seed)
    parts = [evaluation.encode_images(model, torch.randn(min(1000, args.n_img - i0), R, IMG_DIM, generator=gen)
                                      .relu_().numpy(), device=device)  # 1,000 at a time: 10,000 raw = 2.9 GB
             for i0 in range(0, args.n_img, 1000)]
    img = Side(*(None if p[0] is None else torch.cat(p) for p in zip(*parts)))
    for n_q in (1, 100):
        queries = random_captions([pool[k] for k in torch.randint(len(pool), (n_q,), generator=gen).tolist()], gen)
        run = lambda qs: search.top_images(  # noqa: E731  (as search.Searcher.text does)
            model, img, evaluation.encode_captions(model, qs, search.QUERY_BATCH, device), 10,
            precision=args.precision, memory_gb=args.eval_memory_gb)
        run(queries[:1])  # burn-in
        times = []
        while len(times) < 3 and sum(times) < 10:
            t0 = clock(device)
            run(queries)
            times.append(clock(device) - t0)
        t = sorted(times)[len(times) // 2]
        print(f'search, {n_q} text quer{"y" if n_q == 1 else "ies"} per call over {args.n_img:,} images: {t:.3f} s '
              f'per call = {n_q / t:,.1f} queries/s (median of {len(times)}; {memory_mb(device):.0f} MB in use)')
        if n_q == 1:
            print(f'  one query over 100,000 images, extrapolated linearly: {t * 100_000 / args.n_img:.1f} s')


def memory_mb(device, peak: bool = False) -> float:
    """This process's memory now (or its peak since the last reset): CUDA allocator, or resident set."""
    if device.type == 'cuda':
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2 ** 20
    with open('/proc/self/status') as f:
        status = dict(line.split(':', 1) for line in f)
    return int(status['VmHWM' if peak else 'VmRSS'].split()[0]) / 1024  # VmHWM: ru_maxrss of this mm


def reset_peak(device) -> float:
    """Restart the peak-memory count of this process -> its memory now (MB)."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    else:  # reset VmHWM: ru_maxrss may still hold the parent's peak (vfork + exec keeps it)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    return memory_mb(device)


def train_worker(args, pool: list, device):
    """One side's training steps in this fresh process; prints {times, peak_mb, loss} as JSON."""
    torch.manual_seed(args.seed)  # the same weights in both workers
    gen = torch.Generator().manual_seed(args.seed)
    model = CASC(Config(vocab_size=VOCAB)).to(device).train()
    B, K, cfg = args.batch_size, model.cfg.num_labels, model.cfg
    lens = torch.tensor([pool[k] for k in torch.randint(len(pool), (B,), generator=gen).tolist()])
    captions = pad_sequence([torch.tensor(c) for c in random_captions(lens.tolist(), gen)], True)  # (B, L)
    images = torch.randn(B, R, IMG_DIM, generator=gen).relu_()
    targets = (torch.rand(B, K, generator=gen) < 0.02).float()  # ~10 labels per image
    pos_weight = 1 + 99 * torch.rand(K, generator=gen)
    images, captions, lens, targets, pos_weight = (t.to(device) for t in (images, captions, lens, targets, pos_weight))
    times, engine = [], args._train_worker == 'engine'
    before = reset_peak(device)
    for _ in range(1 + (args.train_steps if engine or device.type == 'cuda' else 1)):  # first: burn-in
        t0 = clock(device)
        if engine:
            loss = model(images, captions, lens, targets, pos_weight).loss
        else:  # the authors' way: the same encoders, then all B x B attended vectors
            loss = reference.train_loss(model.img_enc(images), model.txt_enc(captions, lens), lens, targets,
                                        head=head_params(model), pos_weight=pos_weight, margin=cfg.margin,
                                        max_violation=cfg.max_violation, label_weight=cfg.label_weight)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(clock(device) - t0)
    print(json.dumps({'times': times[1:], 'peak_mb': memory_mb(device, peak=True) - before, 'loss': loss.item()}))


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
    diff = abs(ref['loss'] - eng['loss'])
    print(f'|loss difference|: {diff:.2e}')
    return [(f'train step s, B={args.batch_size} (best)', min(ref['times']), min(eng['times']),
             min(ref['times']) / min(eng['times'])),
            ('train peak memory, +MB', ref['peak_mb'], eng['peak_mb'], ref['peak_mb'] / eng['peak_mb']),
            ('train |loss diff|', None, diff, None)]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    with util.one_line_errors():
        device = util.pick_device(args.device)
        util.set_precision(args.precision)
    pool, source = length_pool()
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
    if args.search:
        return bench_search(args, CASC(Config(vocab_size=VOCAB)).to(device).eval(), pool, device)
    rows = bench_eval(args, CASC(Config(vocab_size=VOCAB)).to(device).eval(), pool, device)
    if not args.skip_train:
        rows += bench_train(argv, args)
    fmt = lambda v, spec='.3g': '' if v is None else f'{v:{spec}}'  # noqa: E731
    table = [('metric', "authors' algorithm", 'engine', 'ratio')]
    table += [(m, fmt(r), fmt(e), fmt(q, '.1f') + 'x' * (q is not None)) for m, r, e, q in rows]
    widths = [max(len(row[k]) for row in table) for k in range(4)]
    for row in table:
        print(' | '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print(f'load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other jobs slow every timing)')


if __name__ == '__main__':
    main()
