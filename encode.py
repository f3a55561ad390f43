"""Encode a split once for all its pairs: region features and captions -> prepared Sides
(model.prepare), in batches; a caption with some images (encode_pairs, encode_pair). Used by
evaluation, search, the index, explain.py and bench.py."""
import numpy as np
import torch

import util
from data import pad_captions
from engine import Side
from model import CASC


@torch.inference_mode()
def encode_images(model: CASC, images, batch_size: int = 256, device='cpu') -> Side:
    """images: an (n_img, R, img_dim) array (a memory map is read batch by batch) -> one Side."""
    parts = []
    for i0 in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.array(images[i0:i0 + batch_size], dtype=np.float32))  # a copy: mmaps are read-only
        parts.append(model.encode_images(batch.to(device)))
    return Side(*(None if p[0] is None else torch.cat(p) for p in zip(*parts)))


@torch.inference_mode()
def caption_batches(model: CASC, captions: list, batch_size: int = 128, device='cpu'):
    """captions: lists of word ids -> yields (caption indices (n,), Side) batches of similar length
    (sorted longest first), so each batch is padded only to its own longest caption; one batch in
    memory at a time (index.py writes them to disk as they come)."""
    order = sorted(range(len(captions)), key=lambda k: -len(captions[k]))
    for j0 in range(0, len(order), batch_size):
        idx = order[j0:j0 + batch_size]
        ids, lengths = pad_captions([captions[k] for k in idx])
        yield torch.tensor(idx), model.encode_captions(ids.to(device), lengths.to(device))


def encode_captions(model: CASC, captions: list, batch_size: int = 128, device='cpu', progress: bool = False,
                    log=None) -> list:
    """captions: lists of word ids -> [(caption indices (n,), Side)], all of caption_batches's batches."""
    out = []
    bar = util.progress(total=len(captions), desc='encoding captions', unit='cap', log=log, enabled=progress,
                        leave=False)
    for idx, side in caption_batches(model, captions, batch_size, device):
        out.append((idx, side))
        bar.update(len(idx))
    bar.close()
    return out


def images_slice(img: Side, i0: int, i1: int) -> Side:
    """Images i0..i1 of a prepared Side."""
    return Side(*(None if t is None else t[i0:i1] for t in img))


def encode_pairs(model: CASC, images, rows: list, caption: list, device='cpu') -> tuple:
    """Images `rows` of an (n_img, R, img_dim) array and one caption (a list of word ids) -> (cap,
    [img per row]), Sides of 1, the caption encoded once: what the pages show about a caption's pairs
    is computed from these (explain.py)."""
    cap = encode_captions(model, [caption], device=device)[0][1]
    return cap, [encode_images(model, images[i:i + 1], device=device) for i in rows]


def encode_pair(model: CASC, images, i: int, caption: list, device='cpu') -> tuple:
    """Image i and one caption -> (img, cap), Sides of 1 (encode_pairs of one image)."""
    cap, (img,) = encode_pairs(model, images, [i], caption, device)
    return img, cap
