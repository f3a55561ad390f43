"""features.py: raw images -> {split}_ims.npy (n, 36, 2048) [+ {split}_boxes.npy]. Real image files
of every kind (JPEG, grey PNG, RGBA PNG, palette GIF with transparency, CMYK JPEG, EXIF-rotated
JPEG, odd sizes) in tmp_path; random ResNet-152 weights (--weights none: no network) on 64x64
inputs, so the end-to-end runs take seconds on a CPU."""
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import data
import features
import vocab as vocab_lib
from conftest import ROOT
from test_cli_safety import help_entries

ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}  # the subprocess computes as this one does (see one_thread)
NAMES = ['E_CMYK.JPEG', 'a_rgb.jpg', 'b_grey.png', 'c_rgba.png', 'd_palette.gif', 'f_rotated.jpg', 'g_upright.png']


def picture(w: int, h: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: gradients (no symmetry: a turned picture is another picture) plus noise."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    img = np.stack([x * 255 / w, y * 255 / h, (x + 2 * y) % 97 * 2.5], -1) + rng.normal(0, 20, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_images(root):
    """The kinds of image files the datasets hold, in odd sizes, plus files that are no images."""
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture(40, 52, 1)).convert('CMYK').save(root / 'E_CMYK.JPEG')
    Image.fromarray(picture(37, 23, 2)).save(root / 'a_rgb.jpg', quality=95)
    Image.fromarray(picture(64, 100, 3)[..., 0]).save(root / 'b_grey.png')  # mode L
    alpha = np.where(np.arange(50) < 25, 0, 255).astype(np.uint8)[None].repeat(40, 0)  # left half transparent
    Image.fromarray(np.dstack([picture(50, 40, 4), alpha])).save(root / 'c_rgba.png')
    palette = Image.fromarray(picture(45, 30, 5)).convert('P', palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(root / 'd_palette.gif', transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown turned 90 degrees clockwise
    Image.fromarray(picture(60, 36, 6)).save(root / 'f_rotated.jpg', exif=exif, quality=95)
    with Image.open(root / 'f_rotated.jpg') as stored:  # its pixels as stored, turned by hand
        stored.transpose(Image.Transpose.ROTATE_270).save(root / 'g_upright.png')
    (root / 'notes.txt').write_text('not an image')
    (root / 'sub').mkdir(exist_ok=True)
    Image.fromarray(picture(8, 8)).save(root / 'sub' / 'nested.jpg')  # not directly in the root: not listed
    return root


def argv(data_path, name, image_root, *extra):
    return ['--data_path', str(data_path), '--data_name', name, '--split', 'test', '--image_root', str(image_root),
            '--weights', 'none', '--image_size', '64', '--workers', '0', '--device', 'cpu', *extra]


def refused(args) -> str:
    """features.main(args)'s one-line error."""
    with pytest.raises(SystemExit) as e:
        features.main(args)
    message = str(e.value.code)
    assert message.startswith('error: ') and '\n' not in message, message
    return message


def ims(data_path, name, kind='ims'):
    return np.load(data_path / name / f'test_{kind}.npy')


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """The images; grid features with --batch_size 3 (twice: a, c) and 1 (b)."""
    root = tmp_path_factory.mktemp('features')
    images, data_path = make_images(root / 'images'), root / 'data'
    features.main(argv(data_path, 'a', images, '--batch_size', '3', '--workers', '1'))
    features.main(argv(data_path, 'b', images, '--batch_size', '1'))
    features.main(argv(data_path, 'c', images, '--batch_size', '3'))
    return SimpleNamespace(root=root, images=images, data=data_path)


# ---------------------------------------------------------------- images and names

def test_every_kind_of_image_becomes_rgb_upright(tmp_path):
    images = make_images(tmp_path)
    for name in NAMES:
        assert features.load_rgb(str(images / name)).mode == 'RGB', name
    rgba, gif = features.load_rgb(str(images / 'c_rgba.png')), features.load_rgb(str(images / 'd_palette.gif'))
    assert rgba.getpixel((3, 3)) == (255, 255, 255) and rgba.getpixel((40, 3)) != (255, 255, 255)  # over white
    with Image.open(images / 'd_palette.gif') as img:
        index = np.array(img)
    assert (np.array(gif)[index == 0] == 255).all() and (index == 0).any()  # the transparent colour
    turned = features.load_rgb(str(images / 'f_rotated.jpg'))
    assert turned.size == (36, 60)  # stored 60 x 36, shown upright
    assert np.array_equal(np.array(turned), np.array(features.load_rgb(str(images / 'g_upright.png'))))
    cmyk = np.array(features.load_rgb(str(images / 'E_CMYK.JPEG'))).astype(float)
    assert abs(cmyk - picture(40, 52, 1)).mean() < 10  # CMYK back to the RGB it was made from


@pytest.mark.parametrize('lines, line, why', [  # data.read_image_names's rules, inside --image_root
    (['a.jpg', '', 'b.jpg'], 2, 'empty'),
    (['a.jpg', 'b.jpg', './a.jpg'], 3, "'./a.jpg' names the same image as line 1"),
    (['a.jpg', 'b.jpg', 'a.jpg'], 3, "'a.jpg' names the same image as line 1"),
    (['a.jpg', '../outside.jpg'], 2, "'../outside.jpg' has a '..' part: image names stay inside --image_root"),
    (['a.jpg', 'b.jpg', 'sub/../../images/b.jpg'], 3, "'..' part"),
    (['/etc/hostname'], 1, "'/etc/hostname' is an absolute path, not one inside --image_root"),
    (['a.jpg', 'b.jpg '], 2, "'b.jpg ' has leading or trailing whitespace"),
    (['a.jpg', 'link.jpg'], 2, "'link.jpg' resolves outside --image_root"),
])
def test_names_file_errors_name_the_line(tmp_path, lines, line, why):
    images = tmp_path / 'images'
    images.mkdir()
    for name in ('a.jpg', 'b.jpg'):
        Image.fromarray(picture(10, 10)).save(images / name)
    (tmp_path / 'outside.jpg').write_bytes((images / 'a.jpg').read_bytes())
    (images / 'link.jpg').symlink_to(tmp_path / 'outside.jpg')
    (tmp_path / 'data' / 'n').mkdir(parents=True)
    (tmp_path / 'data' / 'n' / 'test_image_names.txt').write_text('\n'.join(lines) + '\n')
    message = refused(argv(tmp_path / 'data', 'n', images))
    assert f'test_image_names.txt: line {line}: ' in message and why in message
    assert sorted(os.listdir(tmp_path / 'data' / 'n')) == ['test_image_names.txt']  # nothing written
    if 'link.jpg' in lines:  # listing the folder finds the same link
        os.remove(tmp_path / 'data' / 'n' / 'test_image_names.txt')
        assert "'link.jpg' resolves outside" in refused(argv(tmp_path / 'data', 'n', images))


def test_bad_images_all_listed_in_one_error_and_nothing_written(tmp_path):
    images, folder = tmp_path / 'images', tmp_path / 'data' / 'n'
    images.mkdir()
    folder.mkdir(parents=True)
    Image.fromarray(picture(64, 64)).save(images / 'good.jpg', quality=95)
    jpeg = (images / 'good.jpg').read_bytes()
    (images / 'truncated.jpg').write_bytes(jpeg[:len(jpeg) * 2 // 3])
    (images / 'text.jpg').write_text('hello, not a picture')
    (folder / 'test_image_names.txt').write_text('good.jpg\ntruncated.jpg\nmissing.jpg\ntext.jpg\n')
    message = refused(argv(tmp_path / 'data', 'n', images, '--workers', '2'))
    assert '3 of 4 images' in message and 'nothing written' in message
    assert 'truncated.jpg (image file is truncated' in message
    assert 'missing.jpg (missing)' in message and 'text.jpg (not an image file)' in message
    assert 'good.jpg' not in message.replace('--image_root', '')
    assert sorted(os.listdir(folder)) == ['test_image_names.txt']
    for k in range(23):  # many bad files: the first 20 and a count; no names file written either
        (images / f'z{k:02d}.png').write_text('no')
    os.remove(folder / 'test_image_names.txt')
    message = refused(argv(tmp_path / 'data', 'n', images))
    assert '25 of 26 images' in message  # listed sorted: text, truncated, z00 ... z17 are the first 20
    assert 'z17.png' in message and 'z18.png' not in message
    assert message.endswith('; and 5 more') and os.listdir(folder) == []


def test_existing_output_is_refused_without_overwrite_and_replaced_with_it(tmp_path):
    images = tmp_path / 'images'
    images.mkdir()
    Image.fromarray(picture(10, 10)).save(images / 'a.jpg')
    folder = tmp_path / 'data' / 'n'
    folder.mkdir(parents=True)
    np.save(folder / 'test_ims.npy', np.zeros((1, 36, 2048), np.float32))
    before = (folder / 'test_ims.npy').read_bytes()
    assert 'test_ims.npy exists: pass --overwrite' in refused(argv(tmp_path / 'data', 'n', images))
    assert (folder / 'test_ims.npy').read_bytes() == before
    features.main(argv(tmp_path / 'data', 'n', images, '--overwrite'))  # replaced once the new one is complete
    assert (ims(tmp_path / 'data', 'n') > 0).any() and sorted(os.listdir(folder)) == ['test_image_names.txt',
                                                                                     'test_ims.npy']


def test_weights_files_that_do_not_fit_are_refused_naming_them(tmp_path):
    files = {'wrong': {'weight': torch.zeros(3, 3)}, 'list': [torch.zeros(1)], 'code': {'weight': SimpleNamespace()}}
    for name, obj in files.items():
        torch.save(obj, tmp_path / f'{name}.pth')
    (tmp_path / 'text.pth').write_text('not weights')
    why = {'wrong': 'not Linear weights (weight has shape (3, 3), expected (3, 2); 2 mismatches)',
           'list': 'holds a list, not a state_dict', 'text': 'not a PyTorch state_dict file',
           'code': 'refused, it holds Python objects', 'nothing': 'no such file'}
    for name, text in why.items():
        path = str(tmp_path / f'{name}.pth')
        with pytest.raises(ValueError) as e:
            features.load_weights(nn.Linear(2, 3), path, None, '--weights')
        assert str(e.value).startswith(f'--weights {path}: {text}') and 'weights_only' not in str(e.value)


def test_weights_flags_refuse_a_file_of_other_weights_in_one_line(tmp_path):
    images = tmp_path / 'images'
    images.mkdir()
    Image.fromarray(picture(10, 10)).save(images / 'a.jpg')
    torch.save({'conv1.weight': torch.zeros(64, 3, 3, 3)}, tmp_path / 'other.pth')
    other = str(tmp_path / 'other.pth')
    assert f'--weights {other}: not ResNet weights (conv1.weight has shape (64, 3, 3, 3)' in refused(
        argv(tmp_path / 'data', 'n', images, '--weights', other))
    assert f'--detector_weights {other}: not FasterRCNN weights (' in refused(
        argv(tmp_path / 'data', 'n', images, '--regions', 'boxes', '--detector_weights', other))
    assert os.listdir(tmp_path / 'data' / 'n') == []  # nothing written: not even the names file


def test_help_states_every_default_once(capsys):
    with pytest.raises(SystemExit):
        features.parse_args(['--help'])
    out = capsys.readouterr().out
    entries = help_entries(out)
    for flag in ('--data_path', '--data_name', '--split', '--image_root', '--regions', '--weights',
                 '--detector_weights', '--image_size', '--batch_size', '--workers', '--device', '--seed',
                 '--overwrite'):
        (text,) = [t for k, t in entries.items() if k.split()[0] == flag]
        assert text.count('(default: ') + text.count('(required)') == 1 and text.endswith(')'), (flag, text)
    assert '(default: None)' not in out


def test_detect_keeps_the_best_36_boxes_or_fills_up_with_grid_cells():
    img, scale = torch.zeros(3, 20, 40, dtype=torch.uint8), torch.tensor([40., 20., 40., 20.])  # h 20, w 40

    def detector(boxes, scores):  # detections of many classes, as torchvision's detector returns them
        return lambda images: [{'boxes': boxes, 'scores': scores, 'labels': torch.arange(len(scores))}]
    cells = features.grid_cells()
    assert torch.equal(cells[7], torch.tensor([1, 1, 2, 2]) / 6)  # row 1, column 1
    assert torch.equal(features.detect(detector(torch.zeros(0, 4), torch.zeros(0)), img), cells)
    few = torch.tensor([[0, 0, 20, 10], [0, 0, 20, 9.], [20, 10, 40, 20]])  # 2nd: IoU 0.9 with the 1st
    got = features.detect(detector(few, torch.tensor([0.9, 0.8, 0.7])), img)
    assert torch.equal(got, torch.cat([few[[0, 2]] / scale, cells[:34]]))  # NMS across classes, then cells
    many = torch.arange(40.)[:, None] * torch.tensor([1., 0, 1, 0]) + torch.tensor([0, 0, 0.5, 0.5])  # disjoint
    got = features.detect(detector(many, torch.arange(40.) / 40), img)
    assert torch.equal(got, many.flip(0)[:36] / scale)  # the 36 best, best first


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_grid_features_shape_values_batch_independence_and_determinism(world):
    a, b, c = (ims(world.data, name) for name in 'abc')
    assert a.shape == (7, 36, 2048) and a.dtype == np.float32
    assert np.isfinite(a).all() and (a >= 0).all() and (a > 0).any()
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()  # --batch_size 3 vs 1
    assert np.array_equal(a, c)  # the same seed: the same file
    assert (world.data / 'a' / 'test_image_names.txt').read_text().splitlines() == NAMES  # written, sorted
    rotated, upright = NAMES.index('f_rotated.jpg'), NAMES.index('g_upright.png')
    assert np.abs(a[rotated] - a[upright]).max() <= 1e-4 * np.abs(a).max()  # EXIF orientation applied
    assert np.abs(a[rotated] - a[NAMES.index('a_rgb.jpg')]).max() > 0.01 * np.abs(a).max()
    assert sorted(os.listdir(world.data / 'a')) == ['test_image_names.txt', 'test_ims.npy']  # no partial left


@pytest.mark.slow
def test_extracted_split_loads_with_precomp_dataset(world):
    folder = world.data / 'a'
    (folder / 'test_caps.txt').write_text(''.join(f'picture {i} caption {k} .\n' for i in range(7) for k in range(5)))
    vocab = vocab_lib.build_vocab(str(world.data), 'a', threshold=1, splits=('test',))
    dataset = data.PrecompDataset(str(world.data), 'a', 'test', vocab)
    image, caption, _, k, i = dataset[12]
    assert len(dataset) == 35 and dataset.im_div == 5 and image.shape == (36, 2048) and i == 2
    assert np.array_equal(image.numpy(), ims(world.data, 'a')[2])


@pytest.mark.slow
def test_sigkill_then_rerun_equals_an_uninterrupted_run_bit_for_bit(world):
    args = argv(world.data, 'k', world.images, '--batch_size', '1')
    state = world.data / 'k' / 'test_ims.npy.partial.json'
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'features.py'), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline, done = time.time() + 120, 0
    while done < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
        try:
            done = json.loads(state.read_text())['done']
        except (OSError, ValueError):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (world.data / 'k' / 'test_ims.npy.partial').exists() and not (world.data / 'k' / 'test_ims.npy').exists()
    assert 2 <= json.loads(state.read_text())['done'] < 7  # killed midway
    for other in (['--image_size', '96'], ['--batch_size', '2'], ['--seed', '1']):
        message = refused(args + other)
        assert 'test_ims.npy.partial is a partial run made with other arguments' in message
        assert 'delete it or pass --overwrite' in message
    features.main(args)  # continues
    assert np.array_equal(ims(world.data, 'k'), ims(world.data, 'b'))  # b: --batch_size 1, never stopped
    assert sorted(os.listdir(world.data / 'k')) == ['test_image_names.txt', 'test_ims.npy']


@pytest.mark.slow
def test_weights_file_gives_the_features_of_those_weights(world, tmp_path):
    torch.manual_seed(5)
    torch.save(torchvision.models.resnet152().state_dict(), tmp_path / 'resnet152.pth')  # as torchvision's .pth
    for name, extra in (('file', ['--weights', str(tmp_path / 'resnet152.pth')]), ('seed5', ['--seed', '5'])):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'test_image_names.txt').write_text('a_rgb.jpg\n')
        features.main(argv(tmp_path, name, world.images, *extra))
    assert np.array_equal(ims(tmp_path, 'file'), ims(tmp_path, 'seed5'))


@pytest.fixture(scope='module')
def two(tmp_path_factory):
    """Two images of odd sizes for the detector (slow on a CPU)."""
    root = tmp_path_factory.mktemp('boxes')
    (root / 'images').mkdir()
    Image.fromarray(picture(37, 23, 7)).save(root / 'images' / 'a.jpg')
    Image.fromarray(picture(64, 100, 8)[..., 1]).save(root / 'images' / 'b.png')
    return root


def check_boxes(feats, boxes, n):
    assert feats.shape == (n, 36, 2048) and boxes.shape == (n, 36, 4)
    assert feats.dtype == boxes.dtype == np.float32
    assert np.isfinite(feats).all() and (feats >= 0).all() and (feats > 0).any()
    assert (boxes >= 0).all() and (boxes <= 1).all()
    assert (boxes[..., 0] <= boxes[..., 2]).all() and (boxes[..., 1] <= boxes[..., 3]).all()


@pytest.mark.slow
def test_boxes_mode_writes_features_and_boxes_in_the_unit_square(two):
    features.main(argv(two / 'data', 'boxes', two / 'images', '--regions', 'boxes', '--batch_size', '2'))
    check_boxes(ims(two / 'data', 'boxes'), ims(two / 'data', 'boxes', 'boxes'), 2)
    assert sorted(os.listdir(two / 'data' / 'boxes')) == ['test_boxes.npy', 'test_image_names.txt', 'test_ims.npy']


class FewBoxes(nn.Module):
    """A detector that finds 3 boxes in every image, the second one overlapping the first (IoU 0.9)."""

    def forward(self, images):
        found = []
        for img in images:
            h, w = img.shape[1:]
            found.append({'boxes': torch.tensor([[0, 0, w / 2, h / 2], [0, 0, w / 2, h * 0.45], [w / 2, h / 2, w, h]]),
                          'scores': torch.tensor([0.9, 0.8, 0.7]), 'labels': torch.tensor([1, 2, 3])})
        return found


@pytest.mark.slow
def test_boxes_mode_fills_free_slots_with_grid_cells(two, monkeypatch):
    monkeypatch.setattr(features, 'build_detector', lambda *args: FewBoxes())
    features.main(argv(two / 'data', 'few', two / 'images', '--regions', 'boxes'))
    feats, boxes = ims(two / 'data', 'few'), ims(two / 'data', 'few', 'boxes')
    check_boxes(feats, boxes, 2)
    expected = torch.cat([torch.tensor([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]), features.grid_cells()[:34]])
    for image_boxes in boxes:
        assert np.allclose(image_boxes, expected.numpy(), atol=1e-6)
