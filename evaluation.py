"""Evaluate a CASC checkpoint: all-pairs scores in bounded memory, R@K both ways, rsum.

    python evaluation.py --model_path runs/f30k/model_best.pth.tar --data_path DATA --split test
    python evaluation.py --model_path runs/coco/model_best.pth.tar --data_path DATA --split testall --fold5

Loads this project's checkpoints, the authors' release format and SCAN's (no label head), always
with torch.load(weights_only=True).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from data import PrecompDataset, pad_captions
from model import CASC, Config, Side
from vocab import deserialize_vocab

BYTES_PER_CELL = 4 * 12  # float32 (pair, region, word) tensors alive at once in cross_attention
CACHE_CELLS = 1 << 20  # (pair, region, word) cells per chunk: 4 MB tensors stay in cache, ~1.5x faster


@torch.inference_mode()
def encode_images(model: CASC, images, batch_size: int = 256, device='cpu') -> Side:
    """images: an (n_img, R, img_dim) array (a memory map is read batch by batch) -> one Side."""
    parts = []
    for i0 in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.array(images[i0:i0 + batch_size], dtype=np.float32))  # a copy: mmaps are read-only
        parts.append(model.encode_images(batch.to(device)))
    return Side(*(None if p[0] is None else torch.cat(p) for p in zip(*parts)))


@torch.inference_mode()
def encode_captions(model: CASC, captions: list, batch_size: int = 128, device='cpu') -> list:
    """captions: lists of word ids -> [(caption indices (n,), Side)], batches of similar length
    (sorted longest first), so each batch is padded only to its own longest caption."""
    order = sorted(range(len(captions)), key=lambda k: -len(captions[k]))
    out = []
    for j0 in range(0, len(order), batch_size):
        idx = order[j0:j0 + batch_size]
        ids, lengths = pad_captions([captions[k] for k in idx])
        out.append((torch.tensor(idx), model.encode_captions(ids.to(device), lengths.to(device))))
    return out


def _images_slice(img: Side, i0: int, i1: int) -> Side:
    return Side(*(None if t is None else t[i0:i1] for t in img))


@torch.inference_mode()
def compute_sims(model: CASC, img: Side, caps: list, memory_gb: float = 2.0, alpha=None,
                 precision: str = 'fp32', progress: bool = True) -> Tensor:
    """Score matrix (n_img, n_cap) float32 on the CPU, chunked so that the transient tensors of
    one chunk take at most `memory_gb` whatever the split size (on the CPU, chunks are also kept
    small enough for their (pair, region, word) tensors to stay in cache)."""
    n_img, R, _ = img.emb.shape
    n_cap = sum(len(idx) for idx, _ in caps)
    sims = torch.empty(n_img, n_cap)
    bar = tqdm(total=n_img * n_cap, desc='similarity', unit='pair', unit_scale=True,
               disable=not progress or None, mininterval=1.0)
    for idx, cap in caps:
        n_c, L = cap.mask.shape
        per_image = n_c * (R * L * BYTES_PER_CELL + 16 * (model.cfg.num_labels + model.cfg.label_hidden))
        step = int(memory_gb * 2 ** 30 // per_image)
        if img.emb.device.type == 'cpu':
            step = min(step, CACHE_CELLS // (n_c * R * L))
        step = max(1, step)
        for i0 in range(0, n_img, step):
            chunk = model.scores(_images_slice(img, i0, i0 + step), cap, alpha=alpha, precision=precision)['sims']
            sims[i0:i0 + step, idx] = chunk.float().cpu()
            bar.update(chunk.numel())
    bar.close()
    return sims


def ranks(sims: Tensor, im_div: int) -> tuple:
    """sims (n_img, n_cap), caption j showing image j // im_div -> 0-based ranks
    (i2t (n_img,), t2i (n_cap,)). Ties count against the query: a constant score never looks good."""
    n_img, n_cap = sims.shape
    gt = torch.arange(n_cap) // im_div  # (n_cap,) image of each caption
    pos = sims[gt, torch.arange(n_cap)]  # (n_cap,) score of each caption with its own image
    t2i = (sims >= pos).sum(0) - 1  # other images scoring at least as high
    best = pos.view(n_img, im_div).amax(1)  # (n_img,) best ground-truth caption per image
    n_gt_at_best = (pos.view(n_img, im_div) >= best[:, None]).sum(1)
    i2t = (sims >= best[:, None]).sum(1) - n_gt_at_best  # wrong captions at least as high
    return i2t, t2i


def recall_metrics(sims: Tensor, im_div: int) -> dict:
    """R@1/5/10 (percent), median and mean rank (1-based) both ways, and rsum."""
    metrics = {}
    for name, r in zip(('i2t', 't2i'), ranks(sims, im_div)):
        for k in (1, 5, 10):
            metrics[f'{name}_r{k}'] = 100.0 * (r < k).float().mean().item()
        metrics[f'{name}_medr'] = float(np.floor(np.median(r.numpy() + 1)))
        metrics[f'{name}_meanr'] = (r + 1).float().mean().item()
    metrics['rsum'] = sum(metrics[f'{n}_r{k}'] for n in ('i2t', 't2i') for k in (1, 5, 10))
    return metrics


def evaluate_arrays(model: CASC, images, captions: list, device='cpu', memory_gb: float = 2.0, alpha=None,
                    precision: str = 'fp32', progress: bool = True) -> tuple:
    """images (n_img, R, img_dim) array, captions (lists of ids) -> (sims, seconds of scoring)."""
    was_training = model.training
    model.eval()
    img = encode_images(model, images, device=device)
    caps = encode_captions(model, captions, device=device)
    t0 = time.perf_counter()
    sims = compute_sims(model, img, caps, memory_gb, alpha, precision, progress)
    seconds = time.perf_counter() - t0  # compute_sims ends by copying to the CPU: GPU work is done
    model.train(was_training)
    return sims, seconds


def pick_device(name=None) -> torch.device:
    """--device, or by default CUDA when present, else Apple MPS, else the CPU."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device('cuda')
    return torch.device('mps' if torch.backends.mps.is_available() else 'cpu')


def _authors_state(parts: list) -> dict:
    """The release's [image encoder, text encoder, label head] state dicts -> one state dict."""
    state = {}
    for prefix, part in zip(('img_enc.', 'txt_enc.', 'head.'), parts):
        for k, v in part.items():  # torch.nn.utils.weight_norm names -> the parametrization's
            k = k.replace('fc.weight_g', 'fc.parametrizations.weight.original0')
            state[prefix + k.replace('fc.weight_v', 'fc.parametrizations.weight.original1')] = v
    return state


def load_model(path: str, device='cpu', **overrides) -> tuple:
    """Checkpoint -> (CASC in eval mode, options dict, label words or None). Sizes come from the
    weights themselves, so the authors' and SCAN's checkpoints load as well as this project's."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
        opt = ckpt['opt'] if isinstance(ckpt['opt'], dict) else vars(ckpt['opt'])
        state = _authors_state(ckpt['model']) if isinstance(ckpt['model'], list) else ckpt['model']
        sizes = dict(vocab_size=state['txt_enc.embed.weight'].shape[0],
                     word_dim=state['txt_enc.embed.weight'].shape[1],
                     num_labels=state['head.fc2.weight'].shape[0] if 'head.fc2.weight' in state else 0)
        if sizes['num_labels']:
            sizes['label_hidden'] = state['head.fc1.weight'].shape[0]
    except Exception as e:  # a truncated file, a pickle, or a dict of another program
        raise ValueError(f'{path}: not a readable CASC/SCAN checkpoint ({type(e).__name__}: {e})') from None
    model = CASC(Config.from_opt(opt, **sizes, **overrides))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f'{path}: weights do not fit the options stored with them ({e})') from None
    return model.to(device).eval(), opt, ckpt.get('labels')


def print_metrics(m: dict, header: str = ''):
    print(f'{header}rsum: {m["rsum"]:.1f}')
    for name, title in (('i2t', 'Image to text'), ('t2i', 'Text to image')):
        print(f'{title}: R@1 {m[name + "_r1"]:.1f}  R@5 {m[name + "_r5"]:.1f}  R@10 {m[name + "_r10"]:.1f}  '
              f'medr {m[name + "_medr"]:.1f}  meanr {m[name + "_meanr"]:.1f}')


def save_sims(path: str, sims: Tensor, im_div: int):
    """The score matrix as float32 .npy, and 1-based ranks beside it ({stem}_ranks.npz)."""
    np.save(path, sims.numpy().astype(np.float32))
    i2t, t2i = ranks(sims, im_div)
    np.savez(os.path.splitext(path)[0] + '_ranks.npz', i2t=i2t.numpy() + 1, t2i=t2i.numpy() + 1)


def evalrank(model_path: str, data_path: str = None, split: str = 'dev', fold5: bool = False,
             **kw) -> dict:
    """SCAN's entry point: evaluate a checkpoint on a split, print and return the metrics.
    kw: model_path2, data_name, vocab_path, alpha, cross_attn, save_sims, device, precision,
    eval_memory_gb, examples, out, image_dir."""
    device = pick_device(kw.get('device'))
    overrides = {'cross_attn': kw['cross_attn']} if kw.get('cross_attn') else {}
    paths = [p for p in (model_path, kw.get('model_path2')) if p]
    models = [load_model(p, device, **overrides) for p in paths]
    opt = models[0][1]
    data_name = kw.get('data_name') or opt['data_name']
    data_path = data_path or opt['data_path']
    vocab_file = os.path.join(kw.get('vocab_path') or opt.get('vocab_path', 'vocab'), f'{data_name}_vocab.json')
    vocab = deserialize_vocab(vocab_file)
    alpha = kw.get('alpha')
    for (model, _, _), path in zip(models, paths):
        if model.cfg.vocab_size != len(vocab):
            raise ValueError(f'{vocab_file} has {len(vocab)} words but {path} embeds '
                             f'{model.cfg.vocab_size}: use the vocabulary the model was trained with')
        if model.head is None and (model.cfg.alpha if alpha is None else alpha) != 1.0:
            raise ValueError(f'{path} has no label head, so the CASC score cannot be computed: '
                             f'pass --alpha 1 for the local score alone')
    dataset = PrecompDataset(data_path, data_name, split, vocab)
    n_folds = 5 if fold5 else 1
    n_img = dataset.n_images // n_folds
    results, pairs, seconds = [], 0, 0.0
    for f in range(n_folds):
        images = dataset.images[f * n_img:(f + 1) * n_img]
        caps = dataset.captions[f * n_img * dataset.im_div:(f + 1) * n_img * dataset.im_div]
        sims, secs = 0, 0.0
        for model, _, _ in models:  # an ensemble averages the score matrices
            s, t = evaluate_arrays(model, images, caps, device, kw.get('eval_memory_gb', 2.0), alpha,
                                   kw.get('precision', 'fp32'))
            sims, secs = sims + s / len(models), secs + t
        pairs, seconds = pairs + sims.numel(), seconds + secs
        results.append(recall_metrics(sims, dataset.im_div))
        first_sims = sims if f == 0 else first_sims  # the report shows the first fold's images
        if fold5:
            print_metrics(results[-1], f'fold {f}: ')
        if kw.get('save_sims'):
            stem, ext = os.path.splitext(kw['save_sims'])
            save_sims(f'{stem}_fold{f}{ext or ".npy"}' if fold5 else kw['save_sims'], sims, dataset.im_div)
    print(f'similarity: {pairs} pairs in {seconds:.2f} s, {pairs / seconds:.0f} pairs/s')
    metrics = {k: float(np.mean([r[k] for r in results])) for k in results[0]}
    print_metrics(metrics, 'mean of 5 folds: ' if fold5 else '')
    if kw.get('examples'):
        import report
        out = report.write_examples(models[0][0], dataset, first_sims, models[0][2], kw['examples'],
                                    kw.get('out') or 'examples', kw.get('image_dir'), device)
        print(f'retrieval examples written to {out}')
    return metrics


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Evaluate CASC checkpoints.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model_path', required=True, help='checkpoint (this project, the authors or SCAN)')
    p.add_argument('--model_path2', default=None, help='second checkpoint: average the two score matrices')
    p.add_argument('--data_path', default=None, help='default: the one stored in the checkpoint')
    p.add_argument('--data_name', default=None, help='default: the one stored in the checkpoint')
    p.add_argument('--vocab_path', default=None, help='folder of {data_name}_vocab.json (default: checkpoint\'s)')
    p.add_argument('--split', default='test', help='test | testall | dev')
    p.add_argument('--fold5', action='store_true', help='average 5 folds of 1,000 images (COCO 1K)')
    p.add_argument('--save_sims', default=None, metavar='FILE.npy', help='write the score matrix and ranks')
    p.add_argument('--alpha', type=float, default=None, help='local score weight (default: checkpoint\'s, 0.8)')
    p.add_argument('--cross_attn', default=None, choices=('all', 't2i', 'i2t'), help='override the local score')
    p.add_argument('--examples', type=int, default=0, metavar='N', help='write N retrieval examples each way')
    p.add_argument('--out', default='examples', help='folder of the examples report')
    p.add_argument('--image_dir', default=None, help='images, shown in the report when the split has '
                                                     '{split}_image_names.txt')
    p.add_argument('--device', default=None, help='cuda | cpu | mps (default: cuda, else mps, else cpu)')
    p.add_argument('--precision', default='fp32', choices=('fp32', 'tf32', 'bf16'), help='of the region-word product')
    p.add_argument('--eval_memory_gb', type=float, default=2.0, help='memory budget of one scoring chunk')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    kw = {k: v for k, v in vars(args).items() if k not in ('model_path', 'data_path', 'split', 'fold5')}
    try:
        return evalrank(args.model_path, args.data_path, args.split, args.fold5, **kw)
    except (OSError, ValueError) as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main()
