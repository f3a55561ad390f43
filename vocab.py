"""SCAN-compatible vocabulary (and the file --vocab_path names), caption and query files, and the
project's one tokenizer.

    python vocab.py --data_path DATA --data_name f30k_precomp [--vocab_path vocab] [--threshold 4]

writes ``{vocab_path}/{data_name}_vocab.json`` in SCAN's JSON format, so SCAN's published
vocab files and ``from vocab import Vocabulary, deserialize_vocab`` work unchanged. An existing
file with other words is refused unless --overwrite is given.
"""
import json
import os
import signal
from collections import Counter

import util
util.quiet_ctrl_c(__name__)

SPECIALS = ('<pad>', '<start>', '<end>', '<unk>')  # ids 0..3, as in SCAN


class Vocabulary:
    """word <-> id map; ``vocab(word)`` gives ``<unk>``'s id for unknown words."""

    def __init__(self):
        self.word2idx, self.idx2word, self.idx = {}, {}, 0

    def add_word(self, word: str):
        if word not in self.word2idx:
            self.word2idx[word] = self.idx
            self.idx2word[self.idx] = word
            self.idx += 1

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, self.word2idx['<unk>'])

    def __len__(self):
        return len(self.word2idx)

    def words(self) -> list:
        """The words in id order: what a checkpoint stores to pin its vocabulary."""
        return [self.idx2word[i] for i in range(len(self))]

    @classmethod
    def from_words(cls, words: list) -> 'Vocabulary':
        vocab = cls()
        for w in words:
            vocab.add_word(w)
        return vocab


def first_difference(a: list, b: list):
    """The first id where two word lists differ (a length difference counts), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def tokenize(caption: str) -> list:
    """The one tokenizer: lower-case, then NLTK's Treebank word tokenizer (no model needed)."""
    from nltk.tokenize import word_tokenize  # imported here: importing nltk costs ~0.5 s
    return word_tokenize(caption.lower(), preserve_line=True)


def map_batches(fn, items: list, desc: str, workers: int = None, batch: int = 4096):
    """Yield fn(batch) for consecutive batches of items, in order, with a progress bar; spread over
    up to 8 processes (default: the CPU count) when there are enough batches to pay for them."""
    from concurrent.futures import ProcessPoolExecutor
    batches = [items[k:k + batch] for k in range(0, len(items), batch)]
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    with util.progress(total=len(items), desc=desc, unit='cap') as bar:
        if workers > 1 and len(batches) > 4:
            # Workers ignore Ctrl-C: the main process stops them, and no traceback per worker.
            pool = ProcessPoolExecutor(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
            try:
                for part, result in zip(batches, pool.map(fn, batches)):
                    bar.update(len(part))
                    yield result
            finally:  # on Ctrl-C or an error, drop the batches not started yet
                pool.shutdown(cancel_futures=True)
        else:
            for part in batches:
                result = fn(part)
                bar.update(len(part))
                yield result


def _tokenize_batch(captions: list) -> list:
    return [tokenize(c) for c in captions]


def tokenize_all(captions: list, desc: str = 'tokenizing', workers: int = None) -> list:
    """Captions -> token lists (COCO's 566k captions take ~70 s in one process, so large files are
    tokenized in several). Each distinct word is one str object: COCO train has ~7M tokens."""
    words = {}
    return [[words.setdefault(t, t) for t in tokens]
            for part in map_batches(_tokenize_batch, captions, desc, workers) for tokens in part]


def encode(vocab: Vocabulary, tokens: list) -> list:
    """Token list -> ids ``[<start>] + ids + [<end>]``."""
    return [vocab('<start>')] + [vocab(t) for t in tokens] + [vocab('<end>')]


MAX_CAPTION_CHARS = 2000  # 5x the longest Flickr30K caption (380): longer is a broken file


def too_long(text: str) -> str:
    """'' for a caption (or query) of a caption's length, else why not: 'has N characters, more
    than a caption can (2,000)'. The one length check of caption files, annotation files, queries."""
    if len(text) <= MAX_CAPTION_CHARS:
        return ''
    return f'has {len(text):,} characters, more than a caption can ({MAX_CAPTION_CHARS:,})'


def query_tokens(query: str, where: str) -> list:
    """The project's tokens of a text query; ValueError naming `where` when it is longer than a
    caption can be or has no word (empty, or punctuation only)."""
    if too_long(query):
        raise ValueError(f'{where} {too_long(query)}')
    tokens = tokenize(query)
    if not any(ch.isalnum() for t in tokens for ch in t):
        raise ValueError(f'{where}: no words to search for')
    return tokens


def read_queries(path: str) -> list:
    """--queries FILE (UTF-8): one text query per line, blank lines skipped, each checked; ValueError
    naming the file and line of one that is not UTF-8 or not a query."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--queries {path}: file not found')
    lines = [(n, q) for n, q in util.read_text_lines(path) if q]
    if not lines:
        raise ValueError(f'--queries {path}: no queries in it')
    for n, q in lines:
        query_tokens(q, f'{path}: line {n}')
    return [q for _, q in lines]


def read_captions(path: str) -> list:
    """One caption per line (UTF-8). ValueError naming the file and line of an empty, over-long
    (over MAX_CAPTION_CHARS: a missing line break, or not a caption file) or non-UTF-8 line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'caption file not found: {path}')
    caps = []
    for n, cap in util.read_text_lines(path):
        if not cap:
            raise ValueError(f'{path}: line {n} is an empty caption')
        if too_long(cap):
            raise ValueError(f'{path}: line {n} {too_long(cap)}: a missing line break?')
        caps.append(cap)
    return caps


def write_json(obj, path: str, indent=None):
    """Write JSON atomically: a crash mid-write leaves any previous file intact."""
    util.atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent).encode('utf-8')))


def serialize_vocab(vocab: Vocabulary, path: str):
    """Write SCAN's format: {"word2idx": ..., "idx2word": {"0": ...}, "idx": N}, atomically."""
    write_json({'word2idx': vocab.word2idx, 'idx2word': {str(k): w for k, w in vocab.idx2word.items()},
                'idx': vocab.idx}, path)


def deserialize_vocab(path: str) -> Vocabulary:
    """Load a vocab file in SCAN's format; ValueError naming the file when it is not one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'vocabulary file not found: {path} (build it with vocab.py)')
    try:
        with open(path, encoding='utf-8') as f:
            d = json.load(f)
        vocab = Vocabulary()
        vocab.word2idx = {str(w): int(i) for w, i in d['word2idx'].items()}
        vocab.idx2word = {int(i): str(w) for i, w in d['idx2word'].items()}
        vocab.idx = int(d['idx'])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f'{path}: not a SCAN vocabulary JSON with word2idx, idx2word, idx ({e!r})')
    missing = [w for w in SPECIALS if w not in vocab.word2idx]
    if missing:
        raise ValueError(f'{path}: vocabulary lacks the special tokens {missing}')
    n = len(vocab.word2idx)
    for word, i in vocab.word2idx.items():  # ids must be exactly 0..n-1: they index the embedding
        if not 0 <= i < n or vocab.idx2word.get(i) != word:
            why = f'beyond its {n} words' if not 0 <= i < n else f'but idx2word[{i}] is {vocab.idx2word.get(i)!r}'
            raise ValueError(f'{path}: word {word!r} has id {i}, {why}')
    if len(vocab.idx2word) != n or vocab.idx != n:
        raise ValueError(f'{path}: {n} words in word2idx but {len(vocab.idx2word)} in idx2word and idx {vocab.idx}')
    return vocab


def vocab_file(vocab_path: str, data_name: str) -> str:
    """--vocab_path names a folder holding {data_name}_vocab.json, or the file itself."""
    return vocab_path if os.path.isfile(vocab_path) else os.path.join(vocab_path, f'{data_name}_vocab.json')


def count_words(data_path: str, data_name: str, splits=('train', 'dev')) -> Counter:
    """Token counts over ``splits``' captions."""
    counter = Counter()
    for split in splits:
        path = os.path.join(data_path, data_name, f'{split}_caps.txt')
        for tokens in tokenize_all(read_captions(path), f'tokenizing {split}'):
            counter.update(tokens)
    return counter


def build_vocab(data_path: str, data_name: str, threshold: int = 4,
                splits=('train', 'dev'), counter: Counter = None) -> Vocabulary:
    """Count tokens over ``splits``' captions (or take ``counter``); keep words with count >=
    threshold after the specials."""
    counter = count_words(data_path, data_name, splits) if counter is None else counter
    vocab = Vocabulary()
    for w in SPECIALS:
        vocab.add_word(w)
    # Most frequent first, ties alphabetical: deterministic ids across runs and machines.
    for word, count in sorted(counter.items(), key=lambda wc: (-wc[1], wc[0])):
        if count >= threshold:
            vocab.add_word(word)
    return vocab


def dropped_words(counter: Counter, threshold: int, examples: int = 5) -> str:
    """'' when no word is seen fewer than ``threshold`` times, else one line: how many are, the most
    frequent of them, and the flag that keeps them."""
    dropped = sorted(((w, c) for w, c in counter.items() if c < threshold), key=lambda wc: (-wc[1], wc[0]))
    if not dropped:
        return ''
    top = ', '.join(f'{w} ({c})' for w, c in dropped[:examples])
    return (f'{len(dropped)} of {len(counter)} distinct words are seen fewer than --threshold {threshold} '
            f'times and left out (read as <unk>), most frequent first: {top}; --threshold 1 keeps every word')


def parse_args(argv=None):
    p = util.parser(__doc__)
    p.add_argument('--data_path', required=True, help='folder holding {data_name}/{train,dev}_caps.txt')
    p.add_argument('--data_name', default='f30k_precomp', help='dataset folder name')
    p.add_argument('--vocab_path', default='vocab', help='output folder of {data_name}_vocab.json')
    p.add_argument('--threshold', type=util.positive_int, default=4,
                   help='keep words seen at least this many times; the others read as <unk> (the run says '
                        'how many; 1 keeps every word)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing vocabulary with other words')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = os.path.join(args.vocab_path, f'{args.data_name}_vocab.json')
    with util.one_line_errors():
        util.check_writable(out, '--vocab_path')
        counter = count_words(args.data_path, args.data_name)
        vocab = build_vocab(args.data_path, args.data_name, args.threshold, counter=counter)
        note = dropped_words(counter, args.threshold)
        if note:
            print(util.printable(note))  # words from the captions: no control character reaches the terminal
        if not args.overwrite and util.already_written(
                out, lambda path: deserialize_vocab(path).words() == vocab.words(), 'another vocabulary'):
            print(f'{out} already holds this vocabulary of {len(vocab)} words: left as it is')
            return out
        serialize_vocab(vocab, out)
    print(f'vocabulary of {len(vocab)} words written to {out}')
    return out


if __name__ == '__main__':
    main()
