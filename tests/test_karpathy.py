"""data.py --from_karpathy: Karpathy's split files -> SCAN-style {split}_caps.txt and
{split}_image_names.txt, checked before anything is written, loadable by PrecompDataset."""
import contextlib
import io
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import data
import karpathy
from conftest import ROOT, one_line_error
from vocab import MAX_CAPTION_CHARS, build_vocab

DATA_PY = os.path.join(ROOT, 'data.py')


def caps(tag, n=5):
    """n distinct captions that name their image, so a caption on the wrong line shows."""
    return [f'a photo of {tag} number {k}' for k in range(n)]


def entry(filename, split, sentences, **extra):
    """One image as Karpathy's files have it (tokens etc. are ignored by the converter)."""
    return {'filename': filename, 'split': split, 'imgid': 0, **extra,
            'sentences': [{'raw': r, 'tokens': r.lower().split(), 'sentid': 0} for r in sentences]}


def flickr():
    """6 images: train + restval interleaved, one with 6 sentences, one with messy whitespace."""
    messy = ['  A dog\truns\n\nfast  ', 'two\r\ncats  on\u00a0a mat', 'dg 2', 'dg \t 3\n', 'dg 4']
    return {'dataset': 'flickr30k', 'images': [
        entry('aa.jpg', 'train', caps('aa')), entry('bb.jpg', 'restval', caps('bb', 6)),
        entry('cc.jpg', 'val', caps('cc')), entry('dd.jpg', 'train', messy),
        entry('ee.jpg', 'test', caps('ee')), entry('ff.jpg', 'restval', caps('ff'))]}


def write(tmp_path, obj, name='dataset_flickr30k.json') -> str:
    path = tmp_path / name
    path.write_bytes(obj if isinstance(obj, bytes) else json.dumps(obj).encode('utf-8'))
    return str(path)


def run(*argv, process: bool = False):
    """data.py's CLI -> (returncode, stdout, stderr): in this process (fast), or with process=True
    as a real `python data.py` (the exit status and stderr as a shell sees them)."""
    if process:
        return subprocess.run([sys.executable, DATA_PY, *argv], capture_output=True, text=True, timeout=300)
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            data.main(list(argv))
        except SystemExit as e:  # sys.exit('error: ...') prints its message, exit status 1
            code = e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):
                print(e.code, file=err)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def lines(folder, name):
    with open(os.path.join(folder, name), encoding='utf-8') as f:
        text = f.read()
    assert text.endswith('\n') and '\r' not in text
    return text[:-1].split('\n')


def snapshot(folder) -> dict:
    """name -> (bytes, inode, mtime): an atomic rewrite changes the inode even with equal bytes."""
    return {n: (open(os.path.join(folder, n), 'rb').read(), os.stat(os.path.join(folder, n)).st_ino,
                os.stat(os.path.join(folder, n)).st_mtime_ns) for n in sorted(os.listdir(folder))}


@pytest.mark.slow  # a real `python data.py` process; the other tests call data.main in this one
def test_flickr_splits_names_and_folded_captions_through_the_cli(tmp_path):
    proc = run('--from_karpathy', write(tmp_path, flickr()), '--data_path', str(tmp_path / 'out'),
               '--data_name', 'f30k_precomp', process=True)
    assert proc.returncode == 0 and proc.stderr == '', proc.stderr
    folder = str(tmp_path / 'out' / 'f30k_precomp')
    assert sorted(os.listdir(folder)) == sorted(f'{s}_{k}.txt' for s in ('train', 'dev', 'test')
                                                for k in ('caps', 'image_names'))  # no testall: not COCO
    assert lines(folder, 'train_image_names.txt') == ['aa.jpg', 'bb.jpg', 'dd.jpg', 'ff.jpg']  # file order
    assert lines(folder, 'train_caps.txt') == caps('aa') + caps('bb') + [
        'A dog runs fast', 'two cats on a mat', 'dg 2', 'dg 3', 'dg 4'] + caps('ff')
    assert (lines(folder, 'dev_image_names.txt'), lines(folder, 'dev_caps.txt')) == (['cc.jpg'], caps('cc'))
    assert (lines(folder, 'test_image_names.txt'), lines(folder, 'test_caps.txt')) == (['ee.jpg'], caps('ee'))
    assert folder in proc.stdout
    for said in ('train 4 images (20 captions)', 'dev 1 images (5 captions)', 'test 1 images (5 captions)'):
        assert said in proc.stdout


@pytest.mark.parametrize('dataset, filepath', [('coco', True), (None, True), ('coco', False)])
def test_coco_testall_is_every_test_image_and_test_its_first_1000(tmp_path, dataset, filepath):
    where = lambda folder: {'filepath': folder} if filepath else {}  # noqa: E731
    images = [entry('t0.jpg', 'train', caps('t0'), **where('train2014')),
              entry('v0.jpg', 'val', caps('v0'), **where('val2014')),
              entry('r0.jpg', 'restval', caps('r0'), **where('val2014'))]
    images += [entry(f'x{i}.jpg', 'test', caps(f'x{i}'), **where('val2014')) for i in range(1003)]
    top = {'images': images, **({'dataset': dataset} if dataset else {})}
    counts = karpathy.from_karpathy(write(tmp_path, top, 'dataset_coco.json'), str(tmp_path), 'coco_precomp')
    assert counts == {'train': 2, 'dev': 1, 'test': 1000, 'testall': 1003}
    folder = str(tmp_path / 'coco_precomp')
    prefix = 'val2014/' if filepath else ''
    assert lines(folder, 'train_image_names.txt') == [f'{"train2014/" if filepath else ""}t0.jpg', f'{prefix}r0.jpg']
    testall = [f'{prefix}x{i}.jpg' for i in range(1003)]
    assert lines(folder, 'testall_image_names.txt') == testall
    assert lines(folder, 'test_image_names.txt') == testall[:1000]
    assert lines(folder, 'testall_caps.txt') == [c for i in range(1003) for c in caps(f'x{i}')]
    assert lines(folder, 'test_caps.txt') == lines(folder, 'testall_caps.txt')[:5000]


def test_same_filename_in_two_coco_folders_is_two_images(tmp_path):
    top = {'dataset': 'coco', 'images': [entry('x.jpg', 'train', caps('a'), filepath='train2014'),
                                         entry('x.jpg', 'test', caps('b'), filepath='val2014')]}
    assert karpathy.from_karpathy(write(tmp_path, top), str(tmp_path), 'c') == {'train': 1, 'test': 1, 'testall': 1}


def test_an_image_with_4_sentences_is_refused_by_name_and_nothing_is_written(tmp_path):
    top = flickr()
    top['images'][4]['sentences'].pop()  # ee.jpg, the only test image; the other splits are fine
    path = write(tmp_path, top)
    proc = run('--from_karpathy', path, '--data_path', str(tmp_path / 'out'), '--data_name', 'f30k')
    assert proc.returncode == 1 and proc.stdout == ''
    assert proc.stderr.count('\n') == 1 and proc.stderr.startswith(f'error: {path}: images[4]'), proc.stderr
    assert "'ee.jpg'" in proc.stderr and '4 sentences' in proc.stderr
    assert not (tmp_path / 'out').exists()


def set_name(name, filepath=None):
    def edit(top):
        top['images'][2]['filename'] = name
        if filepath is not None:
            top['images'][2]['filepath'] = filepath
    return edit


def set_raw(raw):
    def edit(top):
        top['images'][2]['sentences'][3]['raw'] = raw
    return edit


BAD = {  # edit of the Flickr file -> what its one error line says (every part)
    'absolute': (set_name('/home/me/cc.jpg'), ["images[2] ('/home/me/cc.jpg')", 'relative path']),
    'absolute filepath': (set_name('cc.jpg', '/data/val2014'), ["images[2] ('/data/val2014/cc.jpg')"]),
    'windows absolute': (set_name('C:\\imgs\\cc.jpg'), ["images[2] ('C:\\\\imgs\\\\cc.jpg')"]),
    'dotdot': (set_name('../secret/cc.jpg'), ["images[2] ('../secret/cc.jpg')", "without '..'"]),
    'dotdot in filepath': (set_name('cc.jpg', 'val2014/..'), ["images[2] ('val2014/../cc.jpg')"]),
    'dotdot backslash': (set_name('a\\..\\..\\cc.jpg'), ["images[2] ('a\\\\..", "without '..'"]),
    'line break in name': (set_name('cc\n.jpg'), ["images[2] ('cc\\n.jpg')", 'on one line']),
    'duplicate': (set_name('aa.jpg'), ["images[0] and images[2] have the same name 'aa.jpg'"]),
    'duplicate as a path': (set_name('./aa.jpg'), ["images[0] and images[2] have the same name './aa.jpg'"]),
    'surrounding whitespace': (set_name('cc.jpg '), ["images[2] ('cc.jpg ')", 'surrounding whitespace']),
    'no filename': (lambda top: top['images'][2].pop('filename'), ["images[2] has no 'filename'"]),
    'no split': (lambda top: top['images'][2].pop('split'), ["images[2] has no 'split'"]),
    'no sentences': (lambda top: top['images'][2].pop('sentences'), ["images[2] has no 'sentences'"]),
    'not an object': (lambda top: top['images'].__setitem__(2, 'cc.jpg'), ['images[2] is not an object']),
    'unknown split': (lambda top: top['images'][2].update(split='validation'),
                      ["images[2] ('cc.jpg') has split 'validation': expected one of train, restval, val, test"]),
    'empty caption': (set_raw(' \n\t '), ["images[2] ('cc.jpg'): sentence 3 is empty"]),
    'long caption': (set_raw('x' * (MAX_CAPTION_CHARS + 1)),
                     [f"images[2] ('cc.jpg'): sentence 3 has {MAX_CAPTION_CHARS + 1:,} characters"]),
    'no raw': (lambda top: top['images'][2]['sentences'][3].pop('raw'),
               ["images[2] ('cc.jpg'): sentence 3 has no 'raw'"]),
}


@pytest.mark.parametrize('case', BAD)
def test_bad_image_entries_are_refused_in_one_line_naming_them_writing_nothing(tmp_path, case):
    top = flickr()
    BAD[case][0](top)
    path = write(tmp_path, top)
    message = one_line_error(data.main, ['--from_karpathy', path, '--data_path', str(tmp_path / 'out'),
                                         '--data_name', 'f30k'])
    assert message.startswith(f'error: {path}: ')
    assert all(part in message for part in BAD[case][1]), message
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('content, says', [
    (b'{"images": [', 'not JSON'), (b'\xff\xfe{"images": []}', 'not UTF-8'),
    (b'{"dataset": "flickr8k"}', "no 'images' list"), (b'[1, 2]', "no 'images' list"),
    (b'{"images": {}}', "no 'images' list"), (b'{"images": []}', "'images' list is empty")])
def test_a_file_that_is_not_a_split_file_is_one_line_naming_it(tmp_path, capsys, content, says):
    path = write(tmp_path, content)
    message = one_line_error(data.main, ['--from_karpathy', path, '--data_path', str(tmp_path / 'out'),
                                         '--data_name', 'f30k'])
    assert message.startswith(f'error: {path}: ') and says in message
    assert not (tmp_path / 'out').exists()


def test_a_split_without_images_is_not_written_and_the_run_says_so(tmp_path, capsys):
    top = flickr()
    del top['images'][2]  # the only val image
    assert karpathy.from_karpathy(write(tmp_path, top), str(tmp_path), 'f30k') == {'train': 4, 'test': 1}
    assert sorted(os.listdir(tmp_path / 'f30k')) == ['test_caps.txt', 'test_image_names.txt',
                                                     'train_caps.txt', 'train_image_names.txt']
    assert 'no images for dev' in capsys.readouterr().out


def test_cli_needs_data_path_and_name_with_from_karpathy_and_one_of_the_two_tasks(tmp_path, capsys):
    for argv, says in ((['--from_karpathy', 'x.json', '--data_path', 'd'], 'needs --data_path and --data_name'),
                       (['--from_karpathy', 'x.json', '--data_name', 'n'], 'needs --data_path and --data_name'),
                       ([], 'one of the arguments --make_toy --from_karpathy is required'),
                       (['--make_toy', 'd', '--from_karpathy', 'x.json'], 'not allowed with'),
                       (['--make_toy', 'd', '--data_name', 'n'], 'go with --from_karpathy')):
        with pytest.raises(SystemExit) as e:
            data.parse_args(argv)
        assert e.value.code == 2 and says in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_rerun_identical_leaves_files_changed_captions_need_overwrite(tmp_path):
    path = write(tmp_path, flickr())
    argv = ['--from_karpathy', path, '--data_path', str(tmp_path), '--data_name', 'f30k']
    assert run(*argv).returncode == 0
    folder = str(tmp_path / 'f30k')
    before = snapshot(folder)

    proc = run(*argv)  # same file again: every output left as it is, not rewritten
    assert proc.returncode == 0 and 'left as they are' in proc.stdout and snapshot(folder) == before

    top = flickr()
    top['images'][4]['sentences'][0]['raw'] = 'a new caption'  # test_caps.txt changes, nothing else
    write(tmp_path, top)
    proc = run(*argv)
    assert proc.returncode == 1 and proc.stderr.count('\n') == 1, proc.stderr
    assert os.path.join(folder, 'test_caps.txt') in proc.stderr and '--overwrite' in proc.stderr
    assert snapshot(folder) == before  # refused before writing: the other files untouched too

    proc = run(*argv, '--overwrite')
    assert proc.returncode == 0, proc.stderr
    assert lines(folder, 'test_caps.txt') == ['a new caption'] + caps('ee')[1:]
    after = snapshot(folder)
    assert {n for n in after if after[n] != before[n]} == {'test_caps.txt'}  # identical files kept
    assert 'identical files left as they are' in proc.stdout and 'train_caps.txt' in proc.stdout


def test_written_split_loads_with_caption_k_on_image_k_div_5(tmp_path):
    counts = karpathy.from_karpathy(write(tmp_path, flickr()), str(tmp_path), 'mine_precomp')
    folder = str(tmp_path / 'mine_precomp')
    n_img = counts['train']
    ims = (np.arange(n_img)[:, None, None] + np.random.default_rng(0).random((n_img, 4, 8))).astype(np.float32)
    np.save(os.path.join(folder, 'train_ims.npy'), ims)  # image i's features all in [i, i + 1)
    vocab = build_vocab(str(tmp_path), 'mine_precomp', threshold=1, splits=('train',))
    ds = data.PrecompDataset(str(tmp_path), 'mine_precomp', 'train', vocab)
    names = lines(folder, 'train_image_names.txt')
    assert (len(ds), ds.n_images, ds.im_div) == (5 * n_img, n_img, 5)
    for k in range(len(ds)):
        image, caption, _, cap_id, img_id = ds[k]
        assert (cap_id, img_id) == (k, k // 5) and np.array_equal(image.numpy(), ims[k // 5])
        tag = names[k // 5].split('.')[0]
        assert tag in ds.raw_captions[k] or tag == 'dd'  # dd.jpg's messy captions name no image
