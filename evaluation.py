"""Evaluate a CASC checkpoint: all-pairs scores in bounded memory, R@K both ways, rsum.

    python evaluation.py --model_path runs/f30k/model_best.pth.tar --data_path DATA --split test
"""
import time

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from model import CASC, Side

BYTES_PER_CELL = 4 * 12  # float32 (pair, region, word) tensors alive at once in cross_attention


@torch.inference_mode()
def encode_images(model: CASC, images, batch_size: int = 256, device='cpu') -> Side:
    """images: an (n_img, R, img_dim) array (a memory map is read batch by batch) -> one Side."""
    parts = []
    for i0 in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[i0:i0 + batch_size], dtype=np.float32))
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
        lengths = torch.tensor([len(captions[k]) for k in idx])
        ids = torch.zeros(len(idx), int(lengths.max()), dtype=torch.long)
        for row, k in enumerate(idx):
            ids[row, :len(captions[k])] = torch.tensor(captions[k])
        out.append((torch.tensor(idx), model.encode_captions(ids.to(device), lengths.to(device))))
    return out


def _images_slice(img: Side, i0: int, i1: int) -> Side:
    return Side(*(None if t is None else t[i0:i1] for t in img))


@torch.inference_mode()
def compute_sims(model: CASC, img: Side, caps: list, memory_gb: float = 2.0, alpha=None,
                 precision: str = 'fp32', progress: bool = True, key: str = 'sims') -> Tensor:
    """Score matrix (n_img, n_cap) float32 on the CPU, chunked so that the transient tensors of
    one chunk take about `memory_gb` whatever the split size."""
    n_img, R, _ = img.emb.shape
    n_cap = sum(len(idx) for idx, _ in caps)
    sims = torch.empty(n_img, n_cap)
    bar = tqdm(total=n_img * n_cap, desc='similarity', unit='pair', unit_scale=True,
               disable=not progress or None, mininterval=1.0)
    for idx, cap in caps:
        n_c, L = cap.mask.shape
        per_image = n_c * (R * L * BYTES_PER_CELL + 16 * (model.cfg.num_labels + model.cfg.label_hidden))
        step = max(1, int(memory_gb * 2 ** 30 // per_image))
        for i0 in range(0, n_img, step):
            out = model.scores(_images_slice(img, i0, i0 + step), cap, alpha=alpha, precision=precision)
            sims[i0:i0 + step, idx] = out[key].float().cpu()
            bar.update(out[key].numel())
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


def evaluate_dataset(model: CASC, dataset, device='cpu', memory_gb: float = 2.0, alpha=None,
                     precision: str = 'fp32', progress: bool = True) -> tuple:
    """Encode a PrecompDataset and score all its pairs -> (sims (n_img, n_cap), seconds of scoring)."""
    was_training = model.training
    model.eval()
    img = encode_images(model, dataset.images, device=device)
    caps = encode_captions(model, dataset.captions, device=device)
    if device != 'cpu' and torch.device(device).type == 'cuda':
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    sims = compute_sims(model, img, caps, memory_gb, alpha, precision, progress)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    return sims, seconds
