"""The image names file, ``{split}_image_names.txt``: one name per image of the split, in the order
of ``{split}_ims.npy``, each a relative path inside the image folder. The one reader and the one
set of rules (search.py, report.py, features.py and karpathy.py hold names to them)."""
import ntpath
import os
import posixpath
import re


def name_problem(name: str, root_flag: str):
    """What is wrong with one image name on its own, or None."""
    if not name:
        return 'empty (one image name per line)'
    why = ('has leading or trailing whitespace' if name != name.strip() else
           'has a non-printable character' if not name.isprintable() else
           f'is an absolute path, not one inside {root_flag}' if posixpath.isabs(name) or ntpath.isabs(name) else
           f"has a '..' part: image names stay inside {root_flag}" if '..' in re.split(r'[/\\]', name) else None)
    return why and f'{name!r} {why}'


def check_image_names(names: list, where: str, n_images=None, root: str = None, root_flag: str = '--image_dir') -> list:
    """The names of ``{split}_image_names.txt`` (one per image, in order) -> names, or ValueError
    '{where}: line n ...' at the first that is empty, has surrounding whitespace or a non-printable
    character, is absolute, has a '..' part or repeats an earlier one as a path ('./a.jpg' repeats
    'a.jpg'); with root (the image folder), also at one that resolves outside it (a symlink) or to
    the file of an earlier one. ValueError '{where} ...' for no names, and given n_images, for any
    other count."""
    if not names:
        raise ValueError(f'{where}: no image names in it')
    if root is not None and not os.path.isdir(root):
        raise ValueError(f'{root_flag} {root}: no such folder')
    real_root, seen = root and os.path.realpath(root), {}
    for n, name in enumerate(names, 1):
        why = name_problem(name, root_flag)
        if not why:  # the same image: the same path, or with root, the same file
            key = os.path.realpath(os.path.join(real_root, name)) if root else posixpath.normpath(name)
            if root and os.path.commonpath([real_root, key]) != real_root:
                why = f'{name!r} resolves outside {root_flag} {real_root} (a symlink)'
            elif key in seen:
                why = f'{name!r} names the same image as line {seen[key]}'
            seen[key] = seen.get(key, n)
        if why:
            raise ValueError(f'{where}: line {n}: {why}')
    if n_images is not None and len(names) != n_images:
        raise ValueError(f'{where} has {len(names):,} names but its split has {n_images:,} images')
    return names


def read_image_names(path: str, n_images=None, root: str = None, root_flag: str = '--image_dir') -> list:
    """``{split}_image_names.txt`` (UTF-8, a BOM and CRLF line ends allowed, one name per line,
    nothing stripped) -> its names, checked by ``check_image_names`` (file and line in every error)."""
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        text = raw.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        raise ValueError(f'{path}: line {raw[:e.start].count(10) + 1} is not UTF-8') from None
    names = [n.removesuffix('\r') for n in text.removesuffix('\n').split('\n')] if text else []
    return check_image_names(names, path, n_images, root, root_flag)
