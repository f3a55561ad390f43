"""Evaluate a CASC checkpoint: all-pairs scores in bounded memory, R@K both ways, rsum.

    python evaluation.py --model_path runs/f30k/model_best.pth.tar --data_path DATA --split test
    python evaluation.py --model_path runs/coco/model_best.pth.tar --data_path DATA --split testall --fold5
    torchrun --standalone --nproc_per_node N evaluation.py <the same flags>   (the scoring shared by N processes)

Loads this project's checkpoints, the authors' release format and SCAN's (no label head), always
with torch.load(weights_only=True). Owns: ranks and recalls, the 5-fold split, checks of the inputs
and outputs, the score matrix file, the queries of --examples (drawn by report.py), the command
line (add_scoring_flags: the flags search.py shares). The scores themselves: scoring.py.
"""
import os
import time

import util  # first: it makes a Ctrl-C during the slow imports below one line
util.quiet_ctrl_c(__name__)

import numpy as np
import torch
from torch import Tensor

import parallel
import report
from checkpoint import load_model, model_vocab
from data import PrecompDataset, check_img_dim
from encode import encode_captions, encode_images, encode_pair
from explain import pair_attention, predicted_labels
from engine import PRECISION_HELP, PRECISIONS
from model import CASC
from scoring import check_scores, compute_sims, non_finite, top_k


def ranks(sims: Tensor, im_div: int) -> tuple:
    """sims (n_img, n_cap), caption j showing image j // im_div -> 0-based ranks
    (i2t (n_img,), t2i (n_cap,)). Ties count against the query: a constant score never looks good.
    ValueError for a NaN or inf score (check_scores names its cause)."""
    bad = non_finite(sims)  # one pass over the matrix
    if bad:
        raise ValueError(f'{bad}: not ranked')
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
                    precision: str = 'fp32', progress: bool = True, log=None, *, model_path: str = 'the model',
                    first_image: int = 0) -> tuple:
    """images (n_img, R, img_dim) array (images first_image.. of a features file), captions (lists
    of ids) -> (sims, seconds of scoring); ValueError naming model_path or the features file (a
    memory map's) when a score is NaN or inf (check_scores), on rank 0, which holds the matrix."""
    was_training = model.training
    model.eval()
    img = encode_images(model, images, device=device)
    caps = encode_captions(model, captions, device=device, progress=progress, log=log)
    t0 = time.perf_counter()
    sims = compute_sims(model, img, caps, memory_gb, alpha, precision, progress, log)
    seconds = time.perf_counter() - t0  # compute_sims ends by copying to the CPU: GPU work is done
    model.train(was_training)
    if parallel.is_main():
        check_scores(sims, model, model_path, getattr(images, 'filename', None) or 'the features',
                     range(first_image, first_image + len(images)))
    return sims, seconds


def print_metrics(m: dict, header: str = ''):
    print(f'{header}rsum: {m["rsum"]:.1f}')
    for name, title in (('i2t', 'Image to text'), ('t2i', 'Text to image')):
        print(f'{title}: R@1 {m[name + "_r1"]:.1f}  R@5 {m[name + "_r5"]:.1f}  R@10 {m[name + "_r10"]:.1f}  '
              f'medr {m[name + "_medr"]:.1f}  meanr {m[name + "_meanr"]:.1f}')


def write_sims(path: str, sims: Tensor, im_div: int):
    """The score matrix as float32 .npy, and 1-based ranks beside it ({stem}_ranks.npz); atomic."""
    util.atomic_write(path, lambda f: np.save(f, sims.numpy().astype(np.float32)))
    i2t, t2i = ranks(sims, im_div)
    util.atomic_write(_ranks_path(path), lambda f: np.savez(f, i2t=i2t.numpy() + 1, t2i=t2i.numpy() + 1))


def _ranks_path(sims_path: str) -> str:
    return os.path.splitext(sims_path)[0] + '_ranks.npz'


def _fold_paths(save_path, n_folds: int) -> list:
    """--save_sims FILE -> one path per fold (FILE_fold{f}.npy with --fold5), or Nones."""
    if not save_path:
        return [None] * n_folds
    stem, ext = os.path.splitext(save_path)
    return [f'{stem}_fold{f}{ext or ".npy"}' for f in range(n_folds)] if n_folds > 1 else [save_path]


def _check_folds(n_images: int, split: str, fold5: bool):
    if fold5 and (n_images < 5 or n_images % 5):
        raise ValueError(f'--fold5: the {split} split has {n_images} images, which do not split into 5 '
                         f'equal folds (COCO\'s testall has 5,000)')


def check_memory_budget(eval_memory_gb: float):
    if not (eval_memory_gb > 0 and np.isfinite(eval_memory_gb)):
        raise ValueError(f'--eval_memory_gb {eval_memory_gb}: expected a positive number')


def check_model_fits(model: CASC, path: str, alpha, data_path: str, data_name: str, split: str):
    """ValueError now, not after scoring, when the checkpoint at `path` cannot score the split as asked:
    no label head for the CASC score (alpha != 1), or features of another width than its img_dim."""
    if model.head is None and (model.cfg.alpha if alpha is None else alpha) != 1.0:
        raise ValueError(f'{path} has no label head, so the CASC score cannot be computed: '
                         f'pass --alpha 1 for the local score alone')
    check_img_dim(data_path, data_name, [split], model.cfg.img_dim, f'{path} (img_dim {model.cfg.img_dim})')


def _check_outputs(save_sims, fold5: bool, examples: int, out: str, overwrite: bool):
    """Every file evalrank would write, writable and not already there (unless overwrite)."""
    for path in _fold_paths(save_sims, 5 if fold5 else 1):  # every file written, not only FILE.npy
        for file in ([path, _ranks_path(path)] if path else []):
            util.check_writable(file, '--save_sims')
            if os.path.exists(file) and not overwrite:  # a score matrix may have taken an hour to make
                raise ValueError(f'--save_sims {file} exists: pass --overwrite to replace it, or choose another file')
    if examples:
        report.check_out(out, 'examples.html', overwrite)


def evalrank(model_path: str, data_path: str = None, split: str = 'dev', fold5: bool = False, *,
             model_path2: str = None, data_name: str = None, vocab_path: str = None, alpha: float = None,
             cross_attn: str = None, save_sims: str = None, device: str = None, precision: str = 'fp32',
             eval_memory_gb: float = 2.0, examples: int = 0, out: str = 'examples', image_dir: str = None,
             overwrite: bool = False) -> dict:
    """SCAN's entry point: evaluate a checkpoint (or the ensemble of two) on a split, print and
    return the metrics. Every input and output is checked before any scoring work. Under
    torchrun the processes share the scoring; rank 0 prints, writes and returns the metrics
    (the others return None)."""
    check_memory_budget(eval_memory_gb)
    _check_outputs(save_sims, fold5, examples, out, overwrite)
    device = parallel.start(util.pick_device(device))
    util.set_precision(precision)
    main = parallel.is_main()
    overrides = {'cross_attn': cross_attn} if cross_attn else {}
    paths = [p for p in (model_path, model_path2) if p]
    models = [load_model(p, device, **overrides) for p in paths]
    opt = models[0].opt
    data_name, data_path = data_name or opt['data_name'], data_path or opt['data_path']
    vocabs = [model_vocab(m, p, vocab_path, data_name) for m, p in zip(models, paths)]
    if len(vocabs) == 2 and vocabs[0].words() != vocabs[1].words():
        raise ValueError(f'{paths[0]} and {paths[1]} were trained with different vocabularies: no ensemble')
    for loaded, path in zip(models, paths):
        check_model_fits(loaded.model, path, alpha, data_path, data_name, split)
    dataset = PrecompDataset(data_path, data_name, split, vocabs[0])
    _check_folds(dataset.n_images, split, fold5)
    if examples:
        report.image_names(dataset, image_dir)  # a bad names or boxes file fails now, not after scoring
        report.read_boxes(dataset, dataset.images.shape[1])
    n_folds = 5 if fold5 else 1
    n_img = dataset.n_images // n_folds
    results, pairs, seconds = [], 0, 0.0
    for f, sims_path in enumerate(_fold_paths(save_sims, n_folds)):
        images = dataset.images[f * n_img:(f + 1) * n_img]
        caps = dataset.captions[f * n_img * dataset.im_div:(f + 1) * n_img * dataset.im_div]
        sims, secs = 0, 0.0
        for (model, _, _, _), path in zip(models, paths):  # an ensemble averages the score matrices
            s, t = evaluate_arrays(model, images, caps, device, eval_memory_gb, alpha, precision,
                                   model_path=path, first_image=f * n_img)
            sims, secs = sims + s / len(models), secs + t
        pairs, seconds = pairs + sims.numel(), seconds + secs
        if not main:
            continue
        results.append(recall_metrics(sims, dataset.im_div))
        if f == 0:
            first_sims = sims  # the report shows the first fold's images
        if fold5:
            print_metrics(results[-1], f'fold {f}: ')
        if sims_path:
            write_sims(sims_path, sims, dataset.im_div)
    if not main:
        return None
    print(f'similarity: {pairs} pairs in {seconds:.2f} s, {pairs / seconds:.0f} pairs/s')
    metrics = {k: float(np.mean([r[k] for r in results])) for k in results[0]}
    print_metrics(metrics, 'mean of 5 folds: ' if fold5 else '')
    if examples:
        path = write_examples(models[0].model, dataset, first_sims, models[0].labels, examples, out,
                              image_dir, device, precision, vocabs[0])
        print(f'retrieval examples written to {path}')
    return metrics


def _pick(n_total: int, n: int) -> list:
    """n queries spread evenly over the split (deterministic)."""
    return sorted({int(k) for k in torch.linspace(0, n_total - 1, min(n, n_total))})


def write_examples(model: CASC, dataset, sims: Tensor, label_words, n: int, out_dir: str, image_dir=None,
                   device='cpu', precision: str = 'fp32', vocab=None) -> str:
    """sims (n_img, n_cap) of the dataset's first n_img images -> path of DIR/examples.html
    (report.examples_page draws it): n query images with their top-3 sentences and predicted
    labels, n query sentences with their top-5 images, the top one with the heat maps of where
    each word looks (in `precision`, as the scores were; the words not in `vocab`, the dataset's
    vocabulary, marked as <unk>)."""
    n_img, n_cap = sims.shape
    images = []
    for i in _pick(n_img, n):
        top = top_k(sims[i], 3)
        probs = None if model.head is None else predicted_labels(model, dataset.images, dataset.captions, i, top, device)
        images.append((i, top, probs))
    texts = []
    for j in _pick(n_cap, n):
        top = top_k(sims[:, j], 5)
        pair = encode_pair(model, dataset.images, top[0], dataset.captions[j], device)
        texts.append((j, top, pair_attention(model, *pair, precision)))
    return report.examples_page(dataset, sims, images, texts, label_words, out_dir, image_dir,
                                None if vocab is None else vocab.word2idx)


def add_scoring_flags(p):
    """The flags evaluation.py and search.py share: the checkpoint, its data, and how pairs are scored."""
    p.add_argument('--model_path', required=True, help='checkpoint (this project\'s, the authors\' or SCAN\'s)')
    p.add_argument('--data_path', help='folder holding {data_name}/ (default: the checkpoint\'s)')
    p.add_argument('--data_name', help='dataset folder name (default: the checkpoint\'s)')
    p.add_argument('--vocab_path', help='folder of {data_name}_vocab.json, or the file (default: the vocabulary '
                                        'stored in the checkpoint; required for the authors\' and SCAN\'s)')
    p.add_argument('--alpha', type=util.nonneg_float, help='local score weight (default: the checkpoint\'s, 0.8)')
    p.add_argument('--device', help='cuda | cuda:N | cpu | mps (default: cuda, else mps, else cpu)')
    p.add_argument('--precision', default='fp32', choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument('--eval_memory_gb', type=util.positive_float, default=2.0,
                   help='memory budget of one scoring chunk, in GB')


def parse_args(argv=None):
    p = util.parser(__doc__)
    add_scoring_flags(p)
    p.add_argument('--model_path2', help='second checkpoint: average the two score matrices (default: none)')
    p.add_argument('--split', default='test', help='test | testall | dev')
    p.add_argument('--fold5', action='store_true', help='average 5 folds of 1,000 images (COCO 1K)')
    p.add_argument('--save_sims', metavar='FILE.npy', help='write the score matrix and ranks (default: not written)')
    p.add_argument('--cross_attn', choices=('all', 't2i', 'i2t'), help='override the local score '
                                                                       '(default: the checkpoint\'s)')
    p.add_argument('--examples', type=util.nonneg_int, default=0, metavar='N',
                   help='write N retrieval examples each way')
    p.add_argument('--out', default='examples', help='folder of the examples report, DIR/examples.html')
    p.add_argument('--overwrite', action='store_true', help='replace the files of --save_sims and an examples report (and its pictures) in --out')
    p.add_argument('--image_dir', help='images, shown in the report when the split has {split}_image_names.txt '
                                       '(default: none)')
    return p.parse_args(argv)


def main(argv=None):
    args = vars(parse_args(argv))
    with util.one_line_errors():
        try:
            result = evalrank(args.pop('model_path'), args.pop('data_path'), args.pop('split'), args.pop('fold5'),
                              **args)
            parallel.stop(finished=True)
            return result
        except (OSError, ValueError) as e:
            raise ValueError(parallel.error_line(e)) from None
        finally:
            parallel.stop()


if __name__ == '__main__':
    main()
