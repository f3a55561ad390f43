"""Checkpoints: one plain dict, written atomically, read without ever unpickling code, and tied
to the vocabulary and label set they were trained with.

This project's checkpoints hold {model, optimizers, epoch, Eiters, best_rsum, opt, vocab (the words
in id order), vocab_size, labels}. The authors' release ({model: [img_enc, txt_enc, head], opt:
Namespace}) and SCAN's ({model: [img_enc, txt_enc], opt: a Namespace with SCAN's own option names})
load for evaluation too; they store no vocabulary, so evaluation then needs --vocab_path and trusts it.
"""
import argparse
import os
import pickle
import shutil
import warnings
from typing import NamedTuple, Optional

import torch

import util
from model import CASC, Config
from vocab import Vocabulary, deserialize_vocab, first_difference, vocab_file

# Config fields that change the shapes of the weights: a resumed run must keep them.
SIZE_FIELDS = ('vocab_size', 'word_dim', 'embed_size', 'img_dim', 'num_layers', 'bi_gru',
               'precomp_enc_type', 'num_labels', 'label_hidden')


def save(state: dict, path: str, best_path: str = None):
    """Atomic: a crash or a full disk while writing leaves the previous file intact. The best copy
    is written first: a checkpoint on disk is never newer than the model_best.pth.tar it counts on."""
    first, second = (best_path, path) if best_path else (path, None)
    util.atomic_write(first, lambda f: torch.save(state, f))
    if second:
        with open(first, 'rb') as src:  # a byte copy, streamed: checkpoints run to hundreds of MB
            util.atomic_write(second, lambda f: shutil.copyfileobj(src, f))


def safe_load(path: str, flag: str, what: str = 'readable PyTorch checkpoint'):
    """torch.load(weights_only=True) of an existing file, with one line naming the flag and file when
    it is truncated, not a `what`, or holds objects whose loading could run code."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():  # the authors' opt
            # a plain pickle (protocol 4+) draws torch's advice to file an issue: noise before our one line
            warnings.filterwarnings('ignore', 'Detected pickle protocol', UserWarning)
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'GLOBAL' in str(e):  # torch's advice to drop weights_only is deliberately not passed on
            raise ValueError(f'{flag} {path}: refused, it holds Python objects other than tensors and '
                             f'plain containers, and loading those could run code') from None
        raise ValueError(f'{flag} {path}: not a {what} (corrupt, or another kind of file)') from None
    except Exception:  # a truncated zip, an empty file, ...
        raise ValueError(f'{flag} {path}: not a {what} (truncated or corrupt)') from None


def read(path: str, flag: str = '--model_path') -> dict:
    """safe_load of a CASC/SCAN checkpoint: one line naming the flag and file when the file is
    missing, truncated, not a checkpoint, or holds objects whose loading could run code."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{flag} {path}: checkpoint not found')
    ckpt = safe_load(path, flag)
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get('model'), (dict, list))
            and isinstance(ckpt.get('opt'), (dict, argparse.Namespace))):
        raise ValueError(f'{flag} {path}: not a readable CASC/SCAN checkpoint (no model weights and options)')
    return ckpt


def _authors_state(parts: list) -> dict:
    """The release's [image encoder, text encoder, label head] state dicts -> one state dict."""
    state = {}
    for prefix, part in zip(('img_enc.', 'txt_enc.', 'head.'), parts):
        for k, v in part.items():  # torch.nn.utils.weight_norm names -> the parametrization's
            k = k.replace('fc.weight_g', 'fc.parametrizations.weight.original0')
            state[prefix + k.replace('fc.weight_v', 'fc.parametrizations.weight.original1')] = v
    return state


# SCAN stores one direction's options (cross_attn t2i or i2t) under its own names, with its own
# defaults; it applies agg_func and lambda_softmax to whichever direction scores.
SCAN_DEFAULTS = {'agg_func': 'LogSumExp', 'lambda_softmax': 9.0, 'lambda_lse': 6.0}


def scan_options(opt: dict) -> dict:
    """SCAN's options (agg_func, lambda_softmax; none of CASC's per-direction names) -> the same
    with CASC's names for both directions, so the Config scores as SCAN's xattn_score_t2i/_i2t.
    Any other options dict is returned as it is."""
    if not {'agg_func', 'lambda_softmax'} & set(opt) or {'t2i_agg_func', 'i2t_agg_func'} & set(opt):
        return opt
    scan = {**SCAN_DEFAULTS, **opt}
    return {**scan, 't2i_agg_func': scan['agg_func'], 'i2t_agg_func': scan['agg_func'],
            'lambda_softmax_avg': scan['lambda_softmax'], 'lambda_softmax_lse': scan['lambda_softmax']}


class Loaded(NamedTuple):
    model: CASC  # in eval mode
    opt: dict  # the training options
    labels: Optional[list]  # label words, or None (authors' / SCAN)
    vocab: Optional[list]  # the words in id order, or None (authors' / SCAN / older casc)


def load_model(path: str, device='cpu', **overrides) -> Loaded:
    """Checkpoint -> Loaded. Sizes come from the weights themselves, so the authors' and SCAN's
    checkpoints load as well as this project's; SCAN's option names are mapped (scan_options).
    A model without a label head scores with alpha 1 unless `overrides` say otherwise."""
    ckpt = read(path)
    opt = scan_options(ckpt['opt'] if isinstance(ckpt['opt'], dict) else vars(ckpt['opt']))
    state = _authors_state(ckpt['model']) if isinstance(ckpt['model'], list) else ckpt['model']
    try:
        sizes = dict(vocab_size=state['txt_enc.embed.weight'].shape[0],
                     word_dim=state['txt_enc.embed.weight'].shape[1],
                     num_labels=state['head.fc2.weight'].shape[0] if 'head.fc2.weight' in state else 0)
        if sizes['num_labels']:
            sizes['label_hidden'] = state['head.fc1.weight'].shape[0]
        else:  # no label head (SCAN's, CASC-base): the local score is the only score it has
            sizes['alpha'] = 1.0
        model = CASC(Config.from_opt(opt, **{**sizes, **overrides}))
    except (KeyError, AttributeError, IndexError, TypeError) as e:
        raise ValueError(f'{path}: not a readable CASC/SCAN checkpoint (no {e})') from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f'{path}: weights do not fit the options stored with them ({e})') from None
    return Loaded(model.to(device).eval(), opt, ckpt.get('labels'), ckpt.get('vocab'))


def check_same_words(words: list, trained: list, where: str, ckpt_path: str):
    """ValueError naming the first id where a vocabulary differs from a checkpoint's own."""
    i = first_difference(words, trained)
    if i is not None:
        show = lambda ws: repr(ws[i]) if i < len(ws) else f'missing (it has {len(ws)} words)'  # noqa: E731
        raise ValueError(f'{where}: id {i} is {show(words)} there but {show(trained)} in the vocabulary '
                         f'{ckpt_path} was trained with')


def model_vocab(loaded: Loaded, path: str, vocab_path: str, data_name: str) -> Vocabulary:
    """The vocabulary to encode captions with: the one stored in the checkpoint; a --vocab_path
    must then hold the same words. Checkpoints without one need --vocab_path, which is trusted."""
    if loaded.vocab is None:
        if not vocab_path:
            raise ValueError(f'{path} stores no vocabulary (the authors\' or SCAN\'s format, or an older casc '
                             f'checkpoint): pass --vocab_path, the folder or file it was trained with')
        file = vocab_file(vocab_path, data_name)
        vocab = deserialize_vocab(file)
        if len(vocab) != loaded.model.cfg.vocab_size:
            raise ValueError(f'{file} has {len(vocab)} words but {path} embeds {loaded.model.cfg.vocab_size}: '
                             f'use the vocabulary the model was trained with')
        return vocab
    if vocab_path:
        file = vocab_file(vocab_path, data_name)
        check_same_words(deserialize_vocab(file).words(), loaded.vocab, f'--vocab_path {file}', path)
    return Vocabulary.from_words(loaded.vocab)


def check_resume(ckpt: dict, path: str, cfg: Config, vocab: Vocabulary, vocab_path: str, label_words: list):
    """Refuse, naming what differs, a checkpoint that cannot continue this run: not a training
    checkpoint of this project, another vocabulary or label set, other model sizes."""
    if not (isinstance(ckpt['model'], dict) and isinstance(ckpt['opt'], dict)
            and all(k in ckpt for k in ('optimizers', 'epoch', 'Eiters', 'best_rsum'))):
        raise ValueError(f'--resume {path}: not a casc training checkpoint (no optimizer state); the authors\' '
                         f'and SCAN\'s checkpoints can be evaluated, not resumed')
    if ckpt.get('vocab') is not None:
        check_same_words(vocab.words(), list(ckpt['vocab']), f'--vocab_path {vocab_path}', path)
    elif ckpt.get('vocab_size') is None:
        raise ValueError(f'--resume {path}: stores no vocabulary (neither its words nor their number), so '
                         f'{vocab_path} cannot be checked against it: not a checkpoint of this project\'s train.py')
    elif ckpt['vocab_size'] != len(vocab):
        raise ValueError(f'--resume {path}: made with a vocabulary of {ckpt.get("vocab_size")} words, '
                         f'{vocab_path} has {len(vocab)}')
    if list(ckpt.get('labels', [])) != list(label_words):
        raise ValueError(f'--resume {path}: made with another label set ({len(ckpt.get("labels", []))} labels, '
                         f'here {len(label_words)})')
    trained = Config.from_opt(ckpt['opt'], vocab_size=len(vocab))
    differ = [f for f in SIZE_FIELDS if getattr(trained, f) != getattr(cfg, f)]
    if differ:
        flags = lambda c: ' '.join(f'--{f} {getattr(c, f)}' for f in differ)  # noqa: E731
        raise ValueError(f'--resume {path}: trained with {flags(trained)}, but these flags say {flags(cfg)}')
