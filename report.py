"""Retrieval examples, the view the CASC paper shows: for query images, the top sentences and the
labels the model predicts; for query sentences, the top images. Written by
``evaluation.py --examples N --out DIR`` as DIR/examples.md (Markdown; pictures with --image_dir).
"""
import os

import torch

from evaluation import encode_captions, encode_images


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
    if names is None or image_dir is None:
        return ''
    return f'\n![image {i}]({os.path.join(os.path.abspath(image_dir), names[i])})\n'


def write_examples(model, dataset, sims: torch.Tensor, label_words, n: int, out_dir: str,
                   image_dir=None, device='cpu') -> str:
    """sims (n_img, n_cap) of the dataset's first n_img images -> path of the Markdown report."""
    n_img, n_cap = sims.shape
    im_div, caps = dataset.im_div, dataset.raw_captions
    names_file = os.path.join(os.path.dirname(dataset.caps_path), f'{dataset.split}_image_names.txt')
    names = open(names_file, encoding='utf-8').read().split('\n') if os.path.isfile(names_file) else None
    lines = [f'# Retrieval examples: {dataset.split} split, {n_img} images x {n_cap} captions', '']
    lines += ['## Image to text: top-3 sentences (correct / wrong) and the top-10 predicted labels', '']
    for i in _pick(n_img, n):
        top = sims[i].topk(3).indices.tolist()
        lines += [f'### Image {i}', _picture(names, image_dir, i)]
        lines += [f'{r}. {"correct" if k // im_div == i else "wrong"}: {caps[k]}' for r, k in enumerate(top, 1)]
        if model.head is not None:
            probs = predicted_labels(model, dataset.images, dataset.captions, i, top, device)
            words = label_words or [f'label_{k}' for k in range(len(probs))]
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
