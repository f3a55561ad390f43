"""Karpathy's split files (dataset_{coco,flickr30k,flickr8k}.json) -> SCAN's precomp captions and
image names, ``DATA/NAME/{split}_{caps,image_names}.txt``: the conversion behind
``python data.py --from_karpathy FILE.json --data_path DATA --data_name NAME``."""
import json
import os
import posixpath
import re

import util
from image_names import name_problem
from vocab import too_long

# Karpathy's split files -> SCAN's precomp splits (COCO: 'test' is the 1K, 'testall' the 5K).
KARPATHY_SPLITS = {'train': 'train', 'restval': 'train', 'val': 'dev', 'test': 'test'}
COCO_TEST_1K = 1000


def _load_karpathy(json_path: str) -> tuple:
    """-> (the 'images' list, is COCO); ValueError naming the file when it is not a split file."""
    with open(json_path, 'rb') as f:
        raw = f.read()
    try:
        top = json.loads(raw.decode('utf-8-sig'))  # a BOM (Windows editors) is allowed
    except UnicodeDecodeError as e:
        raise ValueError(f'{json_path}: not UTF-8 text (byte {e.start})') from None
    except json.JSONDecodeError as e:
        raise ValueError(f'{json_path}: not JSON ({e.msg}: line {e.lineno} column {e.colno})') from None
    images = top.get('images') if isinstance(top, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{json_path}: no 'images' list: not one of Karpathy's split files "
                         f"(dataset_coco.json, dataset_flickr30k.json, dataset_flickr8k.json)")
    coco = top.get('dataset') == 'coco' or any(isinstance(e, dict) and 'filepath' in e for e in images)
    return images, coco


def _karpathy_entry(json_path: str, i: int, entry) -> tuple:
    """images[i] -> (precomp split, image name, its first 5 captions on one line each), checked."""
    where = f'{json_path}: images[{i}]'
    if not isinstance(entry, dict):
        raise ValueError(f'{where} is not an object with filename, split and sentences')
    for key, kind in (('filename', str), ('split', str), ('sentences', list), ('filepath', str)):
        if key not in entry and key != 'filepath':  # only COCO has a filepath
            raise ValueError(f'{where} has no {key!r}')
        if key in entry and not isinstance(entry[key], kind):
            raise ValueError(f'{where}: {key!r} is not a {kind.__name__}')
    name = posixpath.join(entry['filepath'], entry['filename']) if 'filepath' in entry else entry['filename']
    where += f' ({name!r})'
    if name_problem(name, '--image_root') or '' in re.split(r'[/\\]', name):  # read_image_names's rules too
        raise ValueError(f"{where}: an image name must be a relative path on one line, without '..', empty parts "
                         f"or surrounding whitespace")
    split = KARPATHY_SPLITS.get(entry['split'])
    if split is None:
        raise ValueError(f"{where} has split {entry['split']!r}: expected one of {', '.join(KARPATHY_SPLITS)}")
    if len(entry['sentences']) < 5:
        raise ValueError(f"{where} has {len(entry['sentences'])} sentences: need 5 captions per image")
    caps = []
    for k, sent in enumerate(entry['sentences'][:5]):
        raw = sent.get('raw') if isinstance(sent, dict) else None
        if not isinstance(raw, str):
            raise ValueError(f"{where}: sentence {k} has no 'raw' text")
        caps.append(' '.join(raw.split()))  # every whitespace run, line breaks included -> one space
        why = 'is empty' if not caps[-1] else too_long(caps[-1])
        if why:
            raise ValueError(f'{where}: sentence {k} {why}')
    return split, name, caps


def from_karpathy(json_path: str, data_path: str, data_name: str, overwrite: bool = False) -> dict:
    """Karpathy's split file (dataset_{coco,flickr30k,flickr8k}.json) -> {split: number of images},
    for the splits that have images, after writing ``data_path/data_name/{split}_caps.txt`` (each
    image's first 5 sentences, whitespace folded) and ``{split}_image_names.txt`` ('filepath/filename'
    or 'filename'): train = 'train' + 'restval' in file order, dev = 'val', test = 'test'; for COCO
    testall = 'test' (5K) and test = its first 1,000. Every image and every existing output file
    is checked before anything is written (ValueError naming the first problem); files that hold
    other contents are refused unless overwrite, identical ones are left as they are."""
    images, coco = _load_karpathy(json_path)
    splits, seen = {s: ([], []) for s in ('train', 'dev', 'test')}, {}  # split -> (names, captions)
    for i, entry in enumerate(images):
        split, name, caps = _karpathy_entry(json_path, i, entry)
        key = posixpath.normpath(name)  # './a.jpg' is 'a.jpg', as read_image_names sees it
        if key in seen:
            raise ValueError(f'{json_path}: images[{seen[key]}] and images[{i}] have the same name {name!r}')
        seen[key] = i
        splits[split][0].append(name)
        splits[split][1].extend(caps)
    if coco:
        names, caps = splits['testall'] = splits['test']  # the 5K split; test = its first 1K
        splits['test'] = names[:COCO_TEST_1K], caps[:5 * COCO_TEST_1K]
    empty = [s for s, (names, _) in splits.items() if not names]
    splits = {s: v for s, v in splits.items() if v[0]}
    if not splits:
        raise ValueError(f"{json_path}: its 'images' list is empty")
    folder = os.path.join(data_path, data_name)
    files = {os.path.join(folder, f'{s}_{kind}.txt'): ('\n'.join(lines) + '\n').encode('utf-8')
             for s, (names, caps) in splits.items() for kind, lines in (('caps', caps), ('image_names', names))}
    kept = [path for path, content in files.items() if util.unchanged(path, content, overwrite, 'other contents', '--data_name')]
    util.check_writable(folder, '--data_path', folder=True)
    for path, content in files.items():
        if path not in kept:
            util.atomic_write(path, lambda f, content=content: f.write(content))
    counts = ', '.join(f'{s} {len(names):,} images ({len(caps):,} captions)' for s, (names, caps) in splits.items())
    if len(kept) == len(files):
        print(f'{folder} already holds these captions and image names: left as they are ({counts})')
    else:
        left = f'; identical files left as they are: {", ".join(map(os.path.basename, kept))}' if kept else ''
        print(f'wrote captions and image names to {folder}: {counts}{left}')
    if empty:
        print(f'no images for {", ".join(empty)}: those files not written')
    print('region features go in {split}_ims.npy, one image per line of {split}_image_names.txt, in that order')
    return {s: len(names) for s, (names, _) in splits.items()}
