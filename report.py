"""Retrieval examples, the view the CASC paper shows: for query images, the top sentences and the
labels the model predicts; for query sentences, the top images. Written by
``evaluation.py --examples N --out DIR`` as DIR/examples.md (Markdown; pictures with --image_dir).
Captions, label words and image names are data: every one is escaped (``md_escape``) or, as a
link target, resolved inside --image_dir and percent-encoded, so none can become markup.
"""
import html
import os
import re
import urllib.parse

import torch

from evaluation import encode_captions, encode_images

_NEWLINES = re.compile(r'\r\n|[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]')
_MD_PUNCT = re.compile(r'([\\`*_\[\]()#])')
_LIST_START = re.compile(r'^(\s*)([+-]|\d+\.)')


def md_escape(text: str) -> str:
    """Data text -> one line of Markdown that renders as exactly that text, with no markup and no
    HTML. ``| ~`` become numeric character references, not backslash escapes: Python-Markdown
    does not unescape ``\\| \\~`` (it would show the backslash), and a reference is never
    structure in CommonMark or GFM (tables, strikethrough) either. ``!`` stays as is: it only
    starts markup as ``![``, and every ``[`` is escaped (captions end with '!')."""
    text = _NEWLINES.sub(' ', text)
    text = _MD_PUNCT.sub(r'\\\1', text)
    text = _LIST_START.sub(lambda m: m[1] + m[2][:-1] + '\\' + m[2][-1], text)  # '- x' '1. x' -> '\- x' '1\. x'
    return html.escape(text, quote=True).replace('|', '&#124;').replace('~', '&#126;')


def image_names(dataset, image_dir) -> list:
    """The split's image file names (``{split}_image_names.txt`` beside its captions, one per line)
    -> list, or None without --image_dir or without that file. Raises ValueError (file, line) on a
    non-UTF-8 or empty line, an absolute name, a name resolving outside image_dir (``..``,
    symlinks), or fewer names than the split's images."""
    path = os.path.join(os.path.dirname(dataset.caps_path), f'{dataset.split}_image_names.txt')
    if image_dir is None or not os.path.isfile(path):
        return None
    with open(path, 'rb') as f:
        raw = f.read().split(b'\n')
    if raw[-1] == b'':
        raw.pop()  # the newline that ends the last line
    names = []
    for n, line in enumerate(raw, 1):
        try:
            names.append(line.removesuffix(b'\r').decode('utf-8'))
        except UnicodeDecodeError:
            raise ValueError(f'{path}: line {n} is not UTF-8') from None
    if len(names) < dataset.n_images:
        raise ValueError(f'{path} has {len(names)} names but the {dataset.split} split has '
                         f'{dataset.n_images} images')
    root = os.path.realpath(image_dir)
    for n, name in enumerate(names, 1):
        why = ('is empty' if not name else 'is an absolute path' if os.path.isabs(name) else
               'has a NUL character' if '\0' in name else None)
        if why:
            raise ValueError(f'{path}: line {n} {why}: image names are relative to --image_dir')
        if os.path.commonpath([root, os.path.realpath(os.path.join(image_dir, name))]) != root:
            raise ValueError(f'{path}: line {n}: {name!r} resolves outside --image_dir {root}')
    return names


def _pick(n_total: int, n: int) -> list:
    """n queries spread evenly over the split (deterministic)."""
    return sorted({int(k) for k in torch.linspace(0, n_total - 1, min(n, n_total))})


@torch.inference_mode()
def predicted_labels(model, images, captions: list, i: int, cap_ids: list, device='cpu') -> torch.Tensor:
    """Label probabilities (K,) of image i: sigmoid(f(u_img)) averaged over the given captions,
    since u_img is the image attended by a caption (as the authors' label view does)."""
    img = encode_images(model, images[i:i + 1], device=device)
    probs = [torch.sigmoid(model.scores(img, cap, alpha=0.0)['logits_img'][0]) for _, cap in
             encode_captions(model, [captions[k] for k in cap_ids], device=device)]
    return torch.cat(probs).mean(0).cpu()


def _picture(names, image_dir, i):
    """A Markdown image of image i, or '' without names. The target is the resolved path, checked
    inside image_dir by ``image_names`` and percent-encoded (spaces and parentheses included)."""
    if names is None:
        return ''
    return f'\n![image {i}]({urllib.parse.quote(os.path.realpath(os.path.join(image_dir, names[i])))})\n'


def write_examples(model, dataset, sims: torch.Tensor, label_words, n: int, out_dir: str,
                   image_dir=None, device='cpu') -> str:
    """sims (n_img, n_cap) of the dataset's first n_img images -> path of the Markdown report."""
    n_img, n_cap = sims.shape
    im_div, caps = dataset.im_div, [md_escape(c) for c in dataset.raw_captions]
    names = image_names(dataset, image_dir)
    lines = [f'# Retrieval examples: {md_escape(dataset.split)} split, {n_img} images x {n_cap} captions', '']
    lines += ['## Image to text: top-3 sentences (correct / wrong) and the top-10 predicted labels', '']
    for i in _pick(n_img, n):
        top = sims[i].topk(3).indices.tolist()
        lines += [f'### Image {i}', _picture(names, image_dir, i)]
        lines += [f'{r}. {"correct" if k // im_div == i else "wrong"}: {caps[k]}' for r, k in enumerate(top, 1)]
        if model.head is not None:
            probs = predicted_labels(model, dataset.images, dataset.captions, i, top, device)
            words = ([md_escape(w) for w in label_words] if label_words else
                     [f'label_{k}' for k in range(len(probs))])
            best = probs.topk(min(10, len(probs)))
            lines += ['', 'Predicted labels: ' + ', '.join(f'{words[k]} ({p:.2f})' for p, k in
                                                           zip(best.values.tolist(), best.indices.tolist()))]
        lines += ['']
    lines += ['## Text to image: top-5 images with their ground-truth captions', '']
    for j in _pick(n_cap, n):
        lines += [f'### Sentence {j}: "{caps[j]}"', '']
        for r, i in enumerate(sims[:, j].topk(min(5, n_img)).indices.tolist(), 1):
            mark = 'correct' if i == j // im_div else 'wrong'
            lines += [f'{r}. image {i} ({mark}): ' + ' / '.join(caps[i * im_div:(i + 1) * im_div]),
                      _picture(names, image_dir, i)]
        lines += ['']
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'examples.md')
    with open(path, 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines))
    return path
