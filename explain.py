"""What the model says about a pair, for the pages (report.py draws it, and imports no model code):
where each word of a caption looks in an image (pair_attention) and the labels it predicts
(pair_labels, predicted_labels). Computed by the callers of the renderer: search.Searcher (its
pages and the server's) and evaluation.py --examples.
"""
import torch

from encode import encode_captions, encode_images
from engine import Side, t2i_attention
from model import CASC


@torch.inference_mode()
def pair_attention(model: CASC, img: Side, cap: Side, precision: str = 'fp32') -> torch.Tensor:
    """One encoded image and one encoded caption (Sides of 1) -> (n_words, R) float32 on the CPU:
    the t2i attention of each real word (not <start>, <end>) over the regions, in caption order."""
    n = int(cap.mask[0].sum())
    return t2i_attention(img, cap, model.cfg, precision)[0, 0, 1:n - 1].float().cpu()  # (L, R) -> (n - 2, R)


@torch.inference_mode()
def pair_labels(model: CASC, img: Side, cap: Side) -> torch.Tensor:
    """One encoded image and one caption -> label probabilities (K,): sigmoid of the head's logits
    for the image attended by that caption."""
    return torch.sigmoid(model.scores(img, cap, alpha=0.0).logits_img[0, 0]).float().cpu()


@torch.inference_mode()
def predicted_labels(model: CASC, images, captions: list, i: int, cap_ids: list, device='cpu') -> torch.Tensor:
    """Label probabilities (K,) of image i: sigmoid(f(u_img)) averaged over the given captions,
    since u_img is the image attended by a caption (as the authors' label view does)."""
    img = encode_images(model, images[i:i + 1], device=device)
    probs = [torch.sigmoid(model.scores(img, cap, alpha=0.0).logits_img[0]) for _, cap in
             encode_captions(model, [captions[k] for k in cap_ids], device=device)]
    return torch.cat(probs).mean(0).float().cpu()
