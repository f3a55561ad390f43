"""Semantic labels for CASC's multi-label head (the K most frequent caption nouns).

    python labels.py --data_path DATA --data_name f30k_precomp [--vocab_path vocab] [--num_labels 500]

writes ``{vocab_path}/{data_name}_labels.json`` with the keys labels, counts, pos_weight,
num_images, splits. An existing file with other contents is refused unless --overwrite is given.
Uses NLTK's averaged_perceptron_tagger_eng and English stop words, shipped in vocab/nltk_data.
"""
import json
import os
import time
from collections import Counter

import util  # first: it makes a Ctrl-C during the slow imports below one line
util.quiet_ctrl_c(__name__)

import numpy as np

from vocab import map_batches, read_captions, tokenize_all, write_json

# The two NLTK resources the labels need ship with the project (no download, no network).
SHIPPED_NLTK = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'vocab', 'nltk_data')
NLTK_PACKAGES = {'averaged_perceptron_tagger_eng': 'taggers/averaged_perceptron_tagger_eng',
                 'stopwords': 'corpora/stopwords'}
NOUN_TAGS = {'NN', 'NNS', 'NNP', 'NNPS'}
KEYS = ('labels', 'counts', 'pos_weight', 'num_images', 'splits')


def use_shipped_nltk():
    """Look in vocab/nltk_data first, then in NLTK_DATA and NLTK's usual places."""
    import nltk
    if SHIPPED_NLTK not in nltk.data.path:
        nltk.data.path.insert(0, SHIPPED_NLTK)


def ensure_nltk():
    """Find the tagger and stop words (shipped in vocab/nltk_data), downloading each once if
    missing there and elsewhere; OSError with what to do when they cannot be had."""
    import nltk
    use_shipped_nltk()
    missing = []
    for name, resource in NLTK_PACKAGES.items():
        try:
            nltk.data.find(resource)
            continue
        except LookupError:
            print(f'downloading NLTK data package {name}')
            nltk.download(name, quiet=True)
        try:
            nltk.data.find(resource)
        except LookupError:
            missing.append(name)
    if missing:
        raise OSError(f'NLTK data {", ".join(missing)} not found and could not be downloaded: '
                           f'run `python -m nltk.downloader {" ".join(missing)}` with network, '
                           f'or set NLTK_DATA to a folder that holds them')


def _count_nouns(token_lists: list) -> Counter:
    """Tag one batch of sentences (in a worker process) -> Counter of its non-stop-word nouns."""
    global _TAGGER, _STOP
    if _TAGGER is None:  # once per process: loading the tagger takes ~0.2 s
        use_shipped_nltk()  # (a spawned worker process starts with NLTK's default path)
        from nltk.corpus import stopwords
        from nltk.tag import PerceptronTagger
        _TAGGER, _STOP = PerceptronTagger(), set(stopwords.words('english'))
    return Counter(w for tagged in _TAGGER.tag_sents(token_lists)
                   for w, tag in tagged if tag in NOUN_TAGS and w not in _STOP)


_TAGGER = _STOP = None


def noun_counts(token_lists: list, workers: int = None) -> Counter:
    """token_lists (n_cap lists of str) -> Counter of tokens tagged NN/NNS/NNP/NNPS, stop words excluded.
    Sentences are tagged in batches, over several processes for large caption files."""
    ensure_nltk()
    counts = Counter()
    for part in map_batches(_count_nouns, token_lists, 'tagging', workers):
        counts.update(part)
    return counts


def image_targets(token_lists: list, labels: list, caps_per_image: int) -> np.ndarray:
    """token_lists (n_cap lists), labels (K,) -> (n_img, K) float32 multi-hot, union over an image's captions."""
    n_cap = len(token_lists)
    if n_cap % caps_per_image:
        raise ValueError(f'{n_cap} captions is not a multiple of {caps_per_image} captions per image')
    index = {w: j for j, w in enumerate(labels)}
    targets = np.zeros((n_cap // caps_per_image, len(labels)), dtype=np.float32)  # (n_img, K)
    for k, tokens in enumerate(token_lists):
        cols = [index[t] for t in set(tokens) if t in index]
        targets[k // caps_per_image, cols] = 1.0
    return targets


def pos_weight(targets: np.ndarray) -> np.ndarray:
    """targets (n_img, K) -> (K,) float32 BCE positive weights (n_img - n_k) / n_k, 1 where n_k = 0."""
    n_img = targets.shape[0]
    n_k = (targets > 0).sum(0).astype(np.float64)  # (K,) images that have label k
    w = np.where(n_k > 0, (n_img - n_k) / np.maximum(n_k, 1), 1.0)
    return w.astype(np.float32)


def caps_per_image(data_dir: str, split: str, n_cap: int) -> int:
    """5, or 1 when {split}_ims.npy holds as many images as there are captions (only its header is read)."""
    ims = os.path.join(data_dir, f'{split}_ims.npy')
    if os.path.isfile(ims):
        n_img = np.load(ims, mmap_mode='r').shape[0]
        if n_cap in (n_img, 5 * n_img):
            return n_cap // n_img
        raise ValueError(f'{ims}: {n_img} images for {n_cap} captions (need 1 or 5 captions per image)')
    if n_cap % 5:
        raise ValueError(f'{data_dir}/{split}_caps.txt: {n_cap} captions is not a multiple of 5 '
                         f'(and {ims} is missing)')
    return 5


def build_labels(data_path: str, data_name: str, num_labels: int = 500, splits=('train', 'dev')) -> dict:
    """Top ``num_labels`` nouns of ``splits``' captions (all of them when there are fewer), most
    frequent first (ties alphabetical), their counts, and pos_weight (K,) over the first split's
    image targets."""
    data_dir = os.path.join(data_path, data_name)
    token_lists = {}
    for split in splits:
        caps = read_captions(os.path.join(data_dir, f'{split}_caps.txt'))
        token_lists[split] = tokenize_all(caps, f'tokenizing {split}')
    counts = noun_counts([t for split in splits for t in token_lists[split]])
    if num_labels < 1:
        raise ValueError(f'--num_labels {num_labels}: need at least 1 label')
    if not counts:
        raise ValueError(f'{data_dir}: no nouns in the {" and ".join(splits)} captions, so no labels '
                         f'(train.py --num_labels 0 trains without them)')
    top = sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))[:num_labels]
    labels = [w for w, _ in top]
    train = token_lists[splits[0]]
    targets = image_targets(train, labels, caps_per_image(data_dir, splits[0], len(train)))
    return {'labels': labels, 'counts': [c for _, c in top], 'pos_weight': pos_weight(targets).tolist(),
            'num_images': int(targets.shape[0]), 'splits': list(splits)}


def save_labels(d: dict, path: str):
    """Write the labels dict as JSON, atomically (tmp file, then rename)."""
    write_json(d, path, indent=1)


def load_labels(path: str) -> dict:
    """Read a labels file written by save_labels; ValueError naming the file when it is not one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'labels file not found: {path} (build it with labels.py)')
    try:
        with open(path, encoding='utf-8') as f:
            d = json.load(f)
        ok = (isinstance(d, dict) and all(k in d for k in KEYS) and isinstance(d['labels'], list)
              and all(isinstance(w, str) for w in d['labels'])
              and isinstance(d['pos_weight'], list) and len(d['pos_weight']) == len(d['labels']))
    except ValueError:  # also UnicodeDecodeError
        ok = False
    if not ok:
        raise ValueError(f'{path}: not a labels JSON with {", ".join(KEYS)} '
                         f'(labels a list of strings, pos_weight of the same length)')
    return d


def parse_args(argv=None):
    p = util.parser(__doc__)
    p.add_argument('--data_path', required=True, help='folder holding {data_name}/{train,dev}_caps.txt')
    p.add_argument('--data_name', default='f30k_precomp', help='dataset folder name')
    p.add_argument('--vocab_path', default='vocab', help='output folder of {data_name}_labels.json')
    p.add_argument('--num_labels', type=util.positive_int, default=500,
                   help='K, the most labels: the K most frequent nouns, or all of them (said so) when the '
                        'captions have fewer (train.py then uses them all)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing labels file with other contents')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = os.path.join(args.vocab_path, f'{args.data_name}_labels.json')
    with util.one_line_errors():
        util.check_writable(out, '--vocab_path')
        t0 = time.perf_counter()
        d = build_labels(args.data_path, args.data_name, args.num_labels)
        secs = time.perf_counter() - t0
        if len(d['labels']) < args.num_labels:
            print(f'only {len(d["labels"])} nouns in the {" and ".join(d["splits"])} captions, fewer than '
                  f'--num_labels {args.num_labels}: using all {len(d["labels"])} as labels')
        n_cap = sum(len(read_captions(os.path.join(args.data_path, args.data_name, f'{split}_caps.txt')))
                    for split in d['splits'])
        if not args.overwrite and util.already_written(out, lambda path: load_labels(path) == d, 'other labels'):
            print(f'{out} already holds these {len(d["labels"])} labels: left as it is')
            return out
        save_labels(d, out)
    print(f'{len(d["labels"])} labels written to {out}; top 10: {" ".join(d["labels"][:10])}; '
          f'tokenized and tagged {n_cap} captions at {n_cap / secs:.0f} captions/s')
    return out


if __name__ == '__main__':
    main()
