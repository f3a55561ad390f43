"""The HTML page of retrieval results: one renderer for ``search.py --out DIR`` (DIR/index.html)
and ``evaluation.py --examples N --out DIR`` (DIR/examples.html). Text queries show their top
images (thumbnails, ground-truth captions and, for some, heat maps of where each query word looks
and the labels the model predicts); image queries show their top captions marked correct or wrong.
It only draws: scores, attention and labels come from its callers (search.Searcher, webapp.py,
evaluation.write_examples; explain.py computes them), and it imports no model code.

One self-contained page (inline CSS, no scripts, no external URL) with its pictures beside it.
Data text (queries, captions, image names, label words) only ever goes through ``esc`` into
element text: never into a tag, an attribute or a URL. Pictures are written under names made of
indices only (img_000012.jpg, q0_r1_w2.png), from image names checked inside --image_dir
(``image_names``).

Pages are made by the commands that score (this file has no command of its own):

    python search.py --model_path CKPT --query "a red dog" --out page [--image_dir IMAGES]
        -> page/index.html: each query's top images, heat maps of where each word looks, labels
    python evaluation.py --model_path CKPT --split test --examples 5 --out examples [--image_dir IMAGES]
        -> examples/examples.html: the view the CASC paper shows
    (an existing page, or pictures of one, in the folder: refused without --overwrite)
"""
import html
import os
import re
import sys

import util  # first: it makes a Ctrl-C during the slow imports below one line
util.quiet_ctrl_c(__name__)

import numpy as np
import torch
from PIL import Image

from featstore import boxes_for, grid_boxes
from image_names import read_image_names
from imagefiles import load_rgb

THUMB = 256  # px: the longer side of a thumbnail
CANVAS = 192  # px: the grey square a heat map is drawn on when there is no thumbnail
N_LABELS = 10  # predicted labels shown per image
CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
section { border-top: 1px solid #ccc; padding: .5em 0 1em; }
ol.results { list-style: none; padding-left: 0; }  /* the rank is printed */
li.result { margin: .6em 0; }
.head span, span.rank, span.score, span.mark { margin-right: .6em; }
.rank { font-weight: bold; } .rank::before { content: '#'; } .score, .name, .caption-index { color: #666; }
.correct .mark { color: #080; font-weight: bold; } .wrong .mark { color: #b00; font-weight: bold; }
img.thumb { display: block; max-width: 256px; max-height: 256px; margin: .3em 0; }
.noimg { display: inline-block; padding: 2em 1em; background: #ddd; color: #555; margin: .3em 0; }
ol.captions { color: #444; margin: .2em 0; }
.heatmaps { display: flex; flex-wrap: wrap; gap: .5em; }
figure { margin: 0; text-align: center; } figure img { max-width: 160px; display: block; }
figure.unknown img { opacity: .45; outline: 2px dashed #b00; } .unk { color: #b00; font-size: 85%; }
ol.labels { display: flex; flex-wrap: wrap; gap: .3em 1.2em; list-style: none; padding-left: 0; margin: .2em 0; }
.prob { color: #666; }
form { margin: .4em 0; } input[type=search] { width: 32em; max-width: 90%; } .error { color: #b00; }
details.attention summary { cursor: pointer; color: #036; }
"""
# Scripts, plugins and a <base> are off whatever the page holds (a second fence behind escaping).
CSP = "script-src 'none'; object-src 'none'; base-uri 'none'; form-action 'none'"
SERVER_CSP = CSP.replace("form-action 'none'", "form-action 'self'")  # the live page's forms (server.py)
PICTURE = re.compile(r'img_\d{6}\.jpg|[a-z]\d+_r\d+_w\d+\.png')  # the names Pictures writes


def esc(text) -> str:
    """Data text -> element text that shows exactly it (quotes escaped too)."""
    return html.escape(str(text), quote=True)


def check_out(out_dir: str, page: str, overwrite: bool = False):
    """Before any scoring: out_dir (--out) writable, and, unless overwrite, neither the page
    (out_dir/page) nor pictures of a page there -> ValueError naming the file and --overwrite."""
    util.check_writable(out_dir, '--out', folder=True)
    path = os.path.join(out_dir, page)
    util.check_writable(path, '--out')
    if overwrite:
        return
    old = [path] if os.path.exists(path) else [os.path.join(out_dir, f) for f in sorted(os.listdir(out_dir))
                                                 if PICTURE.fullmatch(f)]
    if old:
        raise ValueError(f'{old[0]} exists (a page written before): pass --overwrite to replace the page and '
                         f'its pictures, or choose another --out')


# ---------------------------------------------------------------------------------------------
# Where the pictures come from: checked image names, region boxes.

def names_path(dataset) -> str:
    """``{split}_image_names.txt`` beside the split's captions."""
    return os.path.join(os.path.dirname(dataset.caps_path), f'{dataset.split}_image_names.txt')


def image_names(dataset, image_dir) -> list:
    """The split's image names (``names_path``, one per image) checked inside image_dir -> list,
    or None without image_dir or without that file. ValueError (file, line) as
    image_names.read_image_names: a bad line, a name outside image_dir, a count other than the split's
    images; and for an image_dir that is no folder."""
    path = names_path(dataset)
    if image_dir is None or not os.path.isfile(path):
        return None
    return read_image_names(path, dataset.n_images, image_dir)


def read_boxes(dataset, R: int):
    """``{split}_boxes.npy`` beside the split's captions (features.py --regions boxes) -> its
    (n_images, R, 4) float array of (x1, y1, x2, y2) in [0, 1], memory-mapped; None without the
    file, or when it does not belong to the features beside it (featstore.boxes_for: features.py's
    record says so). ValueError naming the file when it is unreadable or of another shape."""
    folder = os.path.dirname(dataset.caps_path)
    path, boxes = os.path.join(folder, f'{dataset.split}_boxes.npy'), boxes_for(folder, dataset.split)
    if boxes is None:
        return None
    if boxes.ndim != 3 or boxes.shape[0] < dataset.n_images or boxes.shape[1:] != (R, 4) or boxes.dtype.kind != 'f':
        raise ValueError(f'{path}: {boxes.dtype} {boxes.shape}, expected float ({dataset.n_images}, {R}, 4) boxes '
                         f'for the {dataset.split} split\'s {R} regions')
    return boxes


def region_boxes(boxes, R: int, i: int) -> np.ndarray:
    """Image i's R region boxes (R, 4) in [0, 1]: from boxes ({split}_boxes.npy, (n, R, 4)) when the
    features have their own, else the grid cells (featstore.grid_boxes)."""
    return grid_boxes(R) if boxes is None else np.asarray(boxes[i], dtype=np.float64)


def heat_map(base, attn: np.ndarray, boxes: np.ndarray) -> Image.Image:
    """attn (R,) over regions, boxes (R, 4) in [0, 1] -> RGB picture: each region's weight added
    over its box (boxes may overlap), scaled by the largest sum, in the 'hot' colours over `base`
    (a PIL RGB image) or, when it is None, over a grey square."""
    base = base if base is not None else Image.new('RGB', (CANVAS, CANVAS), (128, 128, 128))
    W, H = base.size
    heat = np.zeros((H, W))
    px = np.rint(np.clip(np.nan_to_num(boxes), 0, 1) * [W, H, W, H]).astype(int)  # (R, 4) pixels
    for a, (x1, y1, x2, y2) in zip(attn, px):
        heat[min(y1, H - 1):max(y2, y1 + 1), min(x1, W - 1):max(x2, x1 + 1)] += a  # at least one pixel
    heat /= max(heat.max(), 1e-12)
    hot = np.clip(3 * heat[..., None] - [0, 1, 2], 0, 1)  # black -> red -> yellow -> white: (H, W, 3)
    rgb = 0.4 * np.asarray(base, dtype=np.float64) + 0.6 * 255 * hot
    return Image.fromarray(np.rint(rgb).astype(np.uint8), 'RGB')


def load_thumbnail(path) -> Image.Image:
    """An image file (a path or a binary file object) -> upright RGB as imagefiles.load_rgb decodes
    it (transparent pixels over white), at most THUMB px (PIL's errors pass)."""
    thumb = load_rgb(path)
    thumb.thumbnail((THUMB, THUMB))
    return thumb


def thumb_html(src: str, i: int, alt: str = None) -> str:
    """A thumbnail's element: src made of indices only (or a data: URL made here)."""
    return f'<img class="thumb" src="{src}" alt="{esc(alt or f"image {int(i)}")}">'


def figure_html(src: str, w: int, word: str, unknown: bool = False, lazy: bool = False) -> str:
    """Word w's heat map picture (src made of indices, or of a percent-encoded query), captioned
    with the word; a word the vocabulary does not know is marked (the model scored it as <unk>)."""
    cls, mark = ((' class="unknown"', ' <span class="unk">(unknown: scored as &lt;unk&gt;)</span>')
                 if unknown else ('', ''))
    load = ' loading="lazy"' if lazy else ''
    return f'<figure{cls}><img src="{esc(src)}"{load} alt="word {int(w)}"><figcaption>{esc(word)}{mark}</figcaption></figure>'


class Pictures:
    """A page's pictures, written into out_dir under names made of indices: thumbnails of the
    split's images (names from ``image_names``, read once each), heat maps on them."""

    def __init__(self, out_dir: str, names=None, image_dir: str = None, boxes=None, R: int = 36):
        self.out_dir, self.names, self.image_dir, self.boxes, self.R = out_dir, names, image_dir, boxes, R
        self._thumbs = {}
        os.makedirs(out_dir, exist_ok=True)

    def thumbnail(self, i: int):
        """Image i upright, RGB, at most THUMB px, saved as img_{i:06d}.jpg -> PIL image, or None
        without names or when the file cannot be read (a warning on stderr names it)."""
        i = int(i)
        if self.names is None:
            return None
        if i not in self._thumbs:
            path = os.path.join(self.image_dir, self.names[i])
            try:
                thumb = load_thumbnail(path)
                thumb.save(os.path.join(self.out_dir, f'img_{i:06d}.jpg'), quality=90)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                print(util.printable(f'warning: image {i}: cannot read {path} ({e}): shown by its index'),
                      file=sys.stderr)
                thumb = None
            self._thumbs[i] = thumb
        return self._thumbs[i]

    def image(self, i: int) -> str:
        """Image i as a thumbnail, or its index on a grey box."""
        i = int(i)
        if self.thumbnail(i) is None:
            return f'<div class="noimg">image {i}</div>'
        return thumb_html(f'img_{i:06d}.jpg', i)

    def heatmaps(self, stem: str, i: int, words: list, attn: torch.Tensor, known=None) -> str:
        """words (n,) and their attention attn (n, R) over image i's regions -> one figure per word
        ({stem}_w{1..n}.png, captioned with the word), on i's boxes when the split has them, else
        on its grid cells; over its thumbnail when there is one. A word not in `known` (the
        vocabulary's words) is marked: the model scored it as <unk>, not as that word."""
        assert re.fullmatch(r'[a-z0-9_]+', stem), stem  # file names come from indices only
        i = int(i)
        boxes = region_boxes(self.boxes, self.R, i)
        base, figures = self.thumbnail(i), []
        for w, (word, a) in enumerate(zip(words, attn.double().cpu().numpy()), 1):
            name = f'{stem}_w{w}.png'
            heat_map(base, a, boxes).save(os.path.join(self.out_dir, name))
            figures.append(figure_html(name, w, word, known is not None and word not in known))
        return '<div class="heatmaps">' + ''.join(figures) + '</div>'


# ---------------------------------------------------------------------------------------------
# The page: sections and the document.

def labels_html(probs: torch.Tensor, label_words=None) -> str:
    """probs (K,) -> the N_LABELS most probable labels, most probable first, with their probabilities."""
    words = label_words or [f'label_{k}' for k in range(len(probs))]
    best = probs.topk(min(N_LABELS, len(probs)))
    items = ''.join(f'<li class="label"><span class="word">{esc(words[k])}</span> <span class="prob">{p:.2f}</span>'
                    f'</li>' for p, k in zip(best.values.tolist(), best.indices.tolist()))
    return f'<div class="predicted"><p>Predicted labels</p><ol class="labels">{items}</ol></div>'


def _mark(r: dict) -> tuple:
    """A result's li class suffix and its mark span ('' when correctness is unknown)."""
    if 'correct' not in r:
        return '', ''
    word = 'correct' if r['correct'] else 'wrong'
    return f' {word}', f' <span class="mark">{word}</span>'


def text_query_html(pics: Pictures, res: dict, captions, heading: str = 'Query', extras=None) -> str:
    """One text query {'query', 'results': [{'rank', 'index', 'score', 'image_name'?, 'correct'?}]}
    -> a section: per image its rank, score, index (name), picture, captions(i) and extras[rank]
    (heat maps, labels: HTML made here)."""
    items = []
    for r in res['results']:
        i, cls, mark = int(r['index']), *_mark(r)
        name = f' <span class="name">{esc(r["image_name"])}</span>' if 'image_name' in r else ''
        caps = ''.join(f'<li>{esc(c)}</li>' for c in captions(i))
        items.append(f'<li class="result{cls}"><div class="head"><span class="rank">{int(r["rank"])}</span> '
                     f'<span class="score">{float(r["score"]):.4f}</span> <span class="image">image {i}</span>{name}'
                     f'{mark}</div>\n{pics.image(i)}\n<ol class="captions">{caps}</ol>\n'
                     f'{(extras or {}).get(r["rank"], "")}</li>')
    return (f'<section class="text-query"><h3>{esc(heading)}: <q class="query">{esc(res["query"])}</q></h3>\n'
            f'<ol class="results">\n' + '\n'.join(items) + '\n</ol></section>')


def image_query_html(pics: Pictures, res: dict, extra: str = '', title: str = None, picture: str = None) -> str:
    """One image query {'image', 'image_name'?, 'results': [{'rank', 'index', 'score', 'caption',
    'correct'?}]} -> a section: the picture, its top captions marked correct or wrong, extra. A
    picture from outside the split (no 'image'): its title (text) and picture (HTML made by the caller)."""
    i = None if picture else int(res['image'])
    name = f' <span class="name">{esc(res["image_name"])}</span>' if 'image_name' in res else ''
    items = []
    for r in res['results']:
        cls, mark = _mark(r)
        items.append(f'<li class="result{cls}"><span class="rank">{int(r["rank"])}</span> '
                     f'<span class="score">{float(r["score"]):.4f}</span>{mark} '
                     f'<span class="caption-index">caption {int(r["index"])}</span> '
                     f'<span class="caption">{esc(r["caption"])}</span></li>')
    head = esc(title) if title else f'Image {i}{name}'
    return (f'<section class="image-query"><h3>{head}</h3>\n{picture or pics.image(i)}\n<ol class="results">\n'
            + '\n'.join(items) + f'\n</ol>{extra}</section>')


def document(title: str, body: list, csp: str = CSP) -> str:
    """The document: title, inline CSS, the body's sections (the server's page: csp=SERVER_CSP)."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n<title>{esc(title)}</title>\n'
            f'<style>{CSS}</style>\n</head>\n<body>\n<h1>{esc(title)}</h1>\n' + '\n'.join(body) + '\n</body>\n</html>\n')


def write_page(path: str, title: str, body: list) -> str:
    """The document (a file's: no forms), written atomically -> path."""
    doc = document(title, body)
    util.atomic_write(path, lambda f: f.write(doc.encode('utf-8')))
    return path


# ---------------------------------------------------------------------------------------------
# evaluation.py --examples: the view the CASC paper shows.

def examples_page(dataset, sims: torch.Tensor, image_queries: list, text_queries: list, label_words, out_dir: str,
                  image_dir=None, known=None) -> str:
    """sims (n_img, n_cap) of the dataset's first n_img images, the queries the caller picked and
    what it computed for them -> path of DIR/examples.html. image_queries [(i, top caption indices,
    label probabilities (K,) or None)]: each image with its top sentences and predicted labels;
    text_queries [(j, top image indices, attention (n_words, R) of sentence j's words over the
    first image)]: each sentence with its top images, the first with its heat maps (the words not
    in `known`, the vocabulary's words, marked as <unk>)."""
    n_img, n_cap = sims.shape
    im_div, caps, R = dataset.im_div, dataset.raw_captions, dataset.images.shape[1]
    names = image_names(dataset, image_dir)
    pics = Pictures(out_dir, names, image_dir, read_boxes(dataset, R), R)
    named = (lambda i: {'image_name': names[i]}) if names else (lambda i: {})  # noqa: E731
    body = ['<h2>Image to text: top-3 sentences (correct / wrong) and the top-10 predicted labels</h2>']
    for i, top, probs in image_queries:
        res = {'image': i, **named(i), 'results': [
            {'rank': r, 'index': j, 'score': sims[i, j].item(), 'caption': caps[j], 'correct': j // im_div == i}
            for r, j in enumerate(top, 1)]}
        body.append(image_query_html(pics, res, '' if probs is None else labels_html(probs, label_words)))
    body.append('<h2>Text to image: top-5 images with their ground-truth captions; where each word looks in '
                'the first</h2>')
    for q, (j, top, attn) in enumerate(text_queries):
        res = {'query': caps[j], 'results': [
            {'rank': r, 'index': i, 'score': sims[i, j].item(), **named(i), 'correct': i == j // im_div}
            for r, i in enumerate(top, 1)]}
        extras = {1: pics.heatmaps(f's{q}_r1', top[0], dataset.tokens[j], attn, known)}
        body.append(text_query_html(pics, res, dataset.image_captions, f'Sentence {j}', extras))
    title = f'Retrieval examples: {dataset.split} split, {n_img} images x {n_cap} captions'
    return write_page(os.path.join(out_dir, 'examples.html'), title, body)


def main(argv=None):
    """--help: what this module is and which commands write its pages; it does no work of its own."""
    util.parser(__doc__).parse_args(argv)
    sys.exit('report.py has no command of its own: pages are written by search.py --out DIR and '
             'evaluation.py --examples N --out DIR (see python report.py --help)')


if __name__ == '__main__':
    main()
