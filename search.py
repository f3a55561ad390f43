"""Search a split with a CASC checkpoint: text queries -> its top images, query images -> its top captions.

    python search.py --model_path runs/f30k/model_best.pth.tar --split test --query "a dog catches a frisbee"
    python search.py --model_path runs/f30k/model_best.pth.tar --split test --queries queries.txt --k 5 --json
    python search.py --model_path runs/f30k/model_best.pth.tar --split test --image 0 --image 1000092795.jpg
    python search.py --model_path runs/f30k/model_best.pth.tar --query "a dog" --out page --image_dir IMAGES
    python search.py --model_path runs/f30k/model_best.pth.tar --serve --image_dir IMAGES   # a page + JSON API

Owns the Searcher API (a checkpoint and a split: queries, attention, labels, pages; the server goes
through it) and the command line. Scores are evaluation.py's for the same pairs (same alpha, engine
and precision; up to float32 rounding, ~1e-7, which moves with the batch a caption is padded in),
streamed over scoring.py's chunks keeping each query's top k: memory beyond the gallery (encoded once,
or mapped from its index) does not grow with it. Highest score first; equal scores go to the lower
index. Tables (or, with --json, one JSON object per query per line) on stdout; warnings and progress
on stderr. --out DIR also writes an HTML page, DIR/index.html (report.py): thumbnails with --image_dir,
and for each text query's top 3 images where each word looks and the labels the model predicts.
From Python: Searcher(model_path, split='test').text(['a red dog'], k=5) returns what --json prints.
"""
import functools
import json
import os
import re
import sys

import util  # first: it makes a Ctrl-C during the slow imports below one line
util.quiet_ctrl_c(__name__)

import numpy as np
import torch

import index
import report
from checkpoint import load_model, model_vocab
from data import PrecompDataset
from encode import encode_captions, encode_images, encode_pairs
from evaluation import add_scoring_flags, check_memory_budget, check_model_fits
from explain import pair_attention, pair_labels
from image_names import check_image_names, read_image_names
from engine import PRECISIONS, Side
from scoring import top_captions, top_images
from vocab import encode, query_tokens, read_queries

# Text queries are encoded and scored in batches of this many, sorted by length: small batches pad less (100 queries
# of Flickr30K's caption lengths, 1,000 images, the 2-core dev VM: 14k pairs/s in batches of 128, 21k in batches of 16).
QUERY_BATCH = 16


# ---------------------------------------------------------------------------------------------
# The Python API: what the command line prints with --json.

def _in_precision(method):
    """A Searcher method run under its precision (util.precision_scope): the caller's flags come back after it."""
    @functools.wraps(method)
    def run(self, *args, **kw):
        with util.precision_scope(self.score_args['precision']):
            return method(self, *args, **kw)
    return run


class Searcher:
    """A checkpoint and a split to search. .text(queries, k) and .image(indices_or_names, k) return
    one plain dict per query; the gallery is encoded once, the first time a direction needs it.
    Defaults for data_path, data_name and the vocabulary come from the checkpoint, as in evaluation.py.
    The process's TF32 settings are left as they were: each call sets `precision`'s for its own work.
    A NaN or inf score is refused, naming the checkpoint or the features file, not ranked."""

    def __init__(self, model_path: str, data_path: str = None, split: str = 'test', data_name: str = None,
                 vocab_path: str = None, device=None, precision: str = 'fp32', eval_memory_gb: float = 2.0,
                 alpha: float = None, index_dir: str = None):
        check_memory_budget(eval_memory_gb)
        if precision not in PRECISIONS:
            raise ValueError(f'--precision {precision!r}: expected one of {", ".join(PRECISIONS)}')
        self.device = util.pick_device(device)
        loaded = load_model(model_path, self.device)
        self.model = loaded.model
        data_name, data_path = data_name or loaded.opt['data_name'], data_path or loaded.opt['data_path']
        self.vocab, self.labels = model_vocab(loaded, model_path, vocab_path, data_name), loaded.labels
        check_model_fits(self.model, model_path, alpha, data_path, data_name, split)
        self.dataset = PrecompDataset(data_path, data_name, split, self.vocab)
        self.names_path = report.names_path(self.dataset)  # read once, checked as image_names.read_image_names
        self.names = (read_image_names(self.names_path, self.dataset.n_images)
                      if os.path.isfile(self.names_path) else None)
        self.score_args = dict(alpha=alpha, precision=precision, memory_gb=eval_memory_gb, progress=True,
                               model_path=model_path, ims_path=self.dataset.ims_path)
        self._by_name = {name: i for i, name in enumerate(self.names or [])}  # unique (read_image_names)
        self._img = self._caps = None
        self.gallery = None if index_dir is None else index.open_gallery(  # the gallery index (index.py)
            index_dir, model_path, self.model, self.dataset, self.vocab.words(), precision, self.device)

    @_in_precision
    def gallery_images(self) -> Side:
        """The split's images, encoded on the first call (or mapped from the index, built once)."""
        if self._img is None:
            self._img = (self.gallery.images() if self.gallery else
                         encode_images(self.model, self.dataset.images, device=self.device))
        return self._img

    @_in_precision
    def gallery_captions(self) -> list:
        """The split's captions [(caption indices, Side)], encoded at first use (or mapped from the index)."""
        if self._caps is None:
            self._caps = (self.gallery.captions() if self.gallery else
                          encode_captions(self.model, self.dataset.captions, device=self.device, progress=True))
        return self._caps

    @_in_precision
    def text(self, queries, k: int = 10) -> list:
        """Text queries (a str or a list) -> per query {'query': text, 'results': [{'rank', 'index',
        'score', 'image_name' (when the split has names)}]}, the top min(k, n_img) images."""
        queries = [queries] if isinstance(queries, str) else list(queries)
        k = _check_k(k)
        if not queries:
            raise ValueError('no text queries')
        tokens = [query_tokens(q, f'query {_short(q)}') for q in queries]  # all checked before any work
        for q, toks in zip(queries, tokens):
            unknown = ', '.join(map(repr, dict.fromkeys(t for t in toks if t not in self.vocab.word2idx)))
            if unknown:
                print(f'warning: query {_short(q)}: not in the vocabulary, scored as <unk>: {unknown}', file=sys.stderr,
                      flush=True)
        encoded = encode_captions(self.model, [encode(self.vocab, t) for t in tokens], QUERY_BATCH, self.device)
        values, indices = top_images(self.model, self.gallery_images(), encoded, k, **self.score_args)
        return [{'query': q, 'results': _ranked(v, ind, self.name_entry)} for q, v, ind in zip(queries, values, indices)]

    @_in_precision
    def image(self, images, k: int = 10) -> list:
        """Query images (an index into the split from 0, or a name of {split}_image_names.txt; one or
        a list) -> per query {'image': index, 'image_name' (when the split has names), 'results':
        [{'rank', 'index', 'score', 'caption', 'correct'}]}, the top min(k, n_cap) captions; correct:
        caption j describes image j // captions-per-image."""
        images = [images] if isinstance(images, (str, int, np.integer)) else list(images)
        k = _check_k(k)
        if not images:
            raise ValueError('no query images')
        rows = [self.image_index(item) for item in images]
        query = encode_images(self.model, self.dataset.images[rows], device=self.device)
        values, indices = top_captions(self.model, query, self.gallery_captions(), k, rows=rows, **self.score_args)
        ds = self.dataset
        return [{'image': i, **self.name_entry(i), 'results': _ranked(v, ind, lambda j, i=i: {
                    'caption': ds.raw_captions[j], 'correct': j // ds.im_div == i})}
                for i, v, ind in zip(rows, values, indices)]

    def name_entry(self, i: int) -> dict:
        """{'image_name': image i's name} when the split has names, else {}."""
        return {'image_name': self.names[i]} if self.names else {}

    def _pairs(self, query_text: str, images: list) -> tuple:
        """A text query and images (indices or names), all checked first -> the query's tokens, the query
        encoded once and each image encoded (Sides of 1: encode.encode_pairs)."""
        tokens, rows = query_tokens(query_text, f'query {_short(query_text)}'), [self.image_index(i) for i in images]
        return (tokens, *encode_pairs(self.model, self.dataset.images, rows, encode(self.vocab, tokens), self.device))

    @_in_precision
    def attention(self, query_text: str, image_index) -> tuple:
        """Where each word of a text query looks in an image (index or name) -> (words, attn
        (n_words, R) float32): the t2i attention of each real word (not <start>, <end>), in order."""
        tokens, cap, (img,) = self._pairs(query_text, [image_index])
        return tokens, pair_attention(self.model, img, cap, self.score_args['precision'])

    @_in_precision
    def photo(self, features, k: int = 10) -> dict:
        """A picture from outside the split as region features (1, R, img_dim) (features.py) ->
        {'results': [{'rank', 'index', 'score', 'caption'}]}, the split's top min(k, n_cap) captions."""
        k = _check_k(k)
        query = encode_images(self.model, features, device=self.device)
        values, indices = top_captions(self.model, query, self.gallery_captions(), k, **self.score_args)
        return {'results': _ranked(values[0], indices[0], lambda j: {'caption': self.dataset.raw_captions[j]})}

    @_in_precision
    def predicted_labels(self, query_text: str, images) -> torch.Tensor:
        """The labels the model predicts for a text query and an image (index or name) -> (K,)
        probabilities: sigmoid of the head's logits for the image attended by the query. A list of n
        images -> (n, K), each row that image's (K,), with the query encoded once (the server's page)."""
        one = isinstance(images, (str, int, np.integer))
        _, cap, imgs = self._pairs(query_text, [images] if one else images)
        if not imgs:
            raise ValueError('no images to predict labels for')
        probs = torch.stack([pair_labels(self.model, img, cap) for img in imgs])  # (n, K)
        return probs[0] if one else probs

    def page_names(self, image_dir: str = None):
        """The split's image names checked inside image_dir (not read again) -> list, or None without
        image_dir or names; ValueError naming the file and line of one outside it (a symlink)."""
        if image_dir is None or self.names is None:
            return None
        return check_image_names(self.names, self.names_path, self.dataset.n_images, image_dir)

    def check_page(self, image_dir: str = None):
        """The names (inside image_dir) and the boxes file a page would read; ValueError naming them."""
        if image_dir and self.names is None:
            print(f'warning: --image_dir: no thumbnails, {self.names_path} does not exist', file=sys.stderr)
        self.page_names(image_dir)
        report.read_boxes(self.dataset, self.dataset.images.shape[1])

    @_in_precision
    def page(self, results: list, out_dir: str, image_dir: str = None, overwrite: bool = False) -> str:
        """Results of .text or .image -> out_dir/index.html with its pictures; returns its path. Text
        queries: per image its captions (and thumbnail); for the top 3, a heat map of where each word
        looks (words scored as <unk> marked) and the predicted labels. Image queries: the picture and
        its captions, correct or wrong. A page already there is refused without overwrite."""
        report.check_out(out_dir, 'index.html', overwrite)
        ds, R = self.dataset, self.dataset.images.shape[1]
        pics = report.Pictures(out_dir, self.page_names(image_dir), image_dir, report.read_boxes(ds, R), R)
        body = []
        for q, res in enumerate(results):
            if 'query' not in res:
                body.append(report.image_query_html(pics, res))
                continue
            extras, top = {}, res['results'][:3]
            words, cap, imgs = self._pairs(res['query'], [r['index'] for r in top])
            for r, img in zip(top, imgs):
                attn = pair_attention(self.model, img, cap, self.score_args['precision'])
                part = pics.heatmaps(f'q{q}_r{r["rank"]}', r['index'], words, attn, self.vocab.word2idx)
                if self.model.head is not None:
                    part += report.labels_html(pair_labels(self.model, img, cap), self.labels)
                extras[r['rank']] = part
            body.append(report.text_query_html(pics, res, ds.image_captions, 'Query', extras))
        return report.write_page(os.path.join(out_dir, 'index.html'), self.title, body)

    @property
    def title(self) -> str:
        """The pages' title: the split searched."""
        ds = self.dataset
        return f'Search: {ds.split} split, {ds.n_images} images x {len(ds.raw_captions)} captions'

    def image_index(self, item, param: str = '--image') -> int:
        """An image index (int or digits) or name -> its index; ValueError naming it as param (the
        flag, or the server's parameter) and the valid range, or the names file."""
        n, split, text = self.dataset.n_images, self.dataset.split, str(item).strip()
        if isinstance(item, (int, np.integer)) or re.fullmatch(r'[+-]?\d+', text):
            if not 0 <= int(text) < n:
                raise ValueError(f'{param} {text}: no such image, the {split} split has images 0..{n - 1}')
            return int(text)
        if self.names is None:
            raise ValueError(f'{param} {_short(text)}: not an image index (0..{n - 1}), and the {split} split has '
                             f'no image names to look it up in ({self.names_path} does not exist)')
        if text not in self._by_name:
            raise ValueError(f'{param} {_short(text)}: no image of that name in {self.names_path} '
                             f'(image indices: 0..{n - 1})')
        return self._by_name[text]


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n - 3] + '...')  # a query quoted in a message


def _ranked(values, indices, more) -> list:
    """One query's top k, scores and gallery indices (k,) -> [{'rank' (from 1), 'index', 'score', **more(i)}]."""
    pairs = zip(values.tolist(), indices.tolist())
    return [{'rank': r, 'index': i, 'score': s, **more(i)} for r, (s, i) in enumerate(pairs, 1)]


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f'--k {k!r}: expected a positive integer')
    return int(k)


# ---------------------------------------------------------------------------------------------
# Command line.

def table(res: dict) -> str:
    """One query's results as a text table: rank, score, image index and name, or caption index,
    correct and text; data text with its control characters escaped (util.printable)."""
    rows = res['results']
    if 'query' in res:
        title = f'query: "{res["query"]}"'
        header = ['rank', 'score', 'image'] + (['name'] if rows and 'image_name' in rows[0] else [])
        cells = [[r['rank'], f'{r["score"]:.4f}', r['index']] + ([r['image_name']] if 'image_name' in r else [])
                 for r in rows]
    else:
        title = f'image {res["image"]}' + (f' ({res["image_name"]})' if 'image_name' in res else '')
        header = ['rank', 'score', 'caption', 'correct', 'text']
        cells = [[r['rank'], f'{r["score"]:.4f}', r['index'], 'yes' if r['correct'] else 'no', r['caption']]
                 for r in rows]
    cells = [[util.printable(c) for c in row] for row in cells]
    widths = [max(len(c) for c in col) for col in zip(header, *cells)]
    lines = ['  '.join(c.rjust(w) if col < 3 else c.ljust(w)
                       for col, (c, w) in enumerate(zip(row, widths))).rstrip() for row in [header] + cells]
    return '\n'.join([util.printable(title)] + lines)


def parse_args(argv=None):
    p = util.parser(__doc__)
    add_scoring_flags(p)
    p.add_argument('--split', default='test', help='the split searched: its images, or its captions')
    what = p.add_mutually_exclusive_group(required=True)
    one_of = 'one of --query, --queries, --image, --serve is required'
    what.add_argument('--query', action='append', metavar='TEXT',
                      help=f'a text query, repeatable: the top images of each (default: none; {one_of})')
    what.add_argument('--queries', metavar='FILE', help='text queries, one per line (UTF-8, blank lines skipped), '
                                                        f'scored together (default: none; {one_of})')
    what.add_argument('--image', action='append', metavar='N',
                      help='a query image, repeatable: its index in the split (from 0) or its name in '
                           f'{{split}}_image_names.txt; the top captions of each (default: none; {one_of})')
    what.add_argument('--serve', action='store_true', help='serve a page and a JSON API on --host:--port instead '
                      f'(server.py; {one_of})')
    p.add_argument('--k', type=util.positive_int, default=10, help='results per query (at most the gallery size)')
    p.add_argument('--json', action='store_true', help='one JSON object per query per line instead of tables')
    p.add_argument('--out', metavar='DIR', help='also write an HTML page of the results, DIR/index.html, with its '
                                                'pictures (default: none)')
    p.add_argument('--overwrite', action='store_true', help='replace a page (and its pictures) in --out')
    p.add_argument('--image_dir', help='the split\'s images, named in {split}_image_names.txt: thumbnails on the '
                                       'page (default: none; needs --out or --serve)')
    p.add_argument('--index_dir', default='auto', metavar='DIR|auto|none',
                   help='the gallery index (index.py): encoded once, memory-mapped, rebuilt when the checkpoint, '
                        'split or precision change; auto: index/{data_name}_{split}_{precision} beside the '
                        'checkpoint; none: encode the gallery in memory each run')
    p.add_argument('--host', default='127.0.0.1', help='--serve: the address to listen on (another than loopback: '
                                                       'anyone who reaches it can use the server)')
    p.add_argument('--port', type=util.nonneg_int, default=8000, help='--serve: the port (0: a free one)')
    p.add_argument('--max_upload_mb', type=util.positive_float, default=10.0, help='--serve: largest photo upload')
    return p.parse_args(argv)


def main(argv=None) -> list:
    args = parse_args(argv)
    with util.one_line_errors():
        for q in args.query or []:  # refused before the checkpoint is loaded (as --queries lines are)
            query_tokens(q, f'--query {_short(q)}')
        if args.image_dir and not (args.out or args.serve):
            raise ValueError('--image_dir: needs --out DIR or --serve, the page that shows the pictures')
        if args.out:
            report.check_out(args.out, 'index.html', args.overwrite)
        queries = read_queries(args.queries) if args.queries else args.query
        if args.serve and (args.out or args.json):
            raise ValueError(f'--serve: answers on {args.host}:{args.port}, not with --out or --json')
        searcher = Searcher(args.model_path, args.data_path, args.split, args.data_name, args.vocab_path,
                            args.device, args.precision, args.eval_memory_gb, args.alpha,
                            None if args.index_dir == 'none' else args.index_dir)
        if args.serve:  # imported here: the plain command line needs no web server library
            import webapp
            return webapp.main(searcher, args)
        if args.out:
            searcher.check_page(args.image_dir)  # before any scoring
        results = searcher.text(queries, args.k) if queries else searcher.image(args.image, args.k)
    for res in results:
        print(json.dumps(res) if args.json else table(res) + '\n')
    if args.out:
        with util.one_line_errors():
            print(f'page written to {searcher.page(results, args.out, args.image_dir, args.overwrite)}',
                  file=sys.stderr)
    return results


if __name__ == '__main__':
    main()
