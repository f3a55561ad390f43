"""features.py (with imagefiles.py, extractor.py, featstore.py): raw images -> {split}_ims.npy
(n, 36, 2048) [+ {split}_boxes.npy]. Real image files of every kind (JPEG, grey PNG, RGBA PNG,
palette GIF with transparency, CMYK JPEG, EXIF-rotated JPEG, odd sizes) in tmp_path; random
ResNet-152 weights (--weights none: no network) on 64x64 inputs, so the end-to-end runs take
seconds on a CPU."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import data
import extractor
import features
import featstore
import imagefiles
import report
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
        assert imagefiles.load_rgb(str(images / name)).mode == 'RGB', name
    rgba, gif = imagefiles.load_rgb(str(images / 'c_rgba.png')), imagefiles.load_rgb(str(images / 'd_palette.gif'))
    assert rgba.getpixel((3, 3)) == (255, 255, 255) and rgba.getpixel((40, 3)) != (255, 255, 255)  # over white
    with Image.open(images / 'd_palette.gif') as img:
        index = np.array(img)
    assert (np.array(gif)[index == 0] == 255).all() and (index == 0).any()  # the transparent colour
    turned = imagefiles.load_rgb(str(images / 'f_rotated.jpg'))
    assert turned.size == (36, 60)  # stored 60 x 36, shown upright
    assert np.array_equal(np.array(turned), np.array(imagefiles.load_rgb(str(images / 'g_upright.png'))))
    cmyk = np.array(imagefiles.load_rgb(str(images / 'E_CMYK.JPEG'))).astype(float)
    assert abs(cmyk - picture(40, 52, 1)).mean() < 10  # CMYK back to the RGB it was made from


@pytest.mark.parametrize('lines, line, why', [  # image_names.read_image_names's rules, inside --image_root
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
                                                                                     'test_ims.json', 'test_ims.npy']


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
            extractor.load_weights(nn.Linear(2, 3), path, None, '--weights')
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
                 '--detector_weights', '--image_size', '--detector_size', '--max_pixels', '--batch_size',
                 '--workers', '--device', '--seed', '--overwrite'):
        (text,) = [t for k, t in entries.items() if k.split()[0] == flag]
        assert text.count('(default: ') + text.count('(required)') == 1 and text.endswith(')'), (flag, text)
    assert '(default: None)' not in out


def test_detect_keeps_the_best_36_boxes_or_fills_up_with_grid_cells():
    img, scale = torch.zeros(3, 20, 40, dtype=torch.uint8), torch.tensor([40., 20., 40., 20.])  # h 20, w 40

    def detector(boxes, scores):  # detections of many classes, as torchvision's detector returns them
        return lambda images: [{'boxes': boxes, 'scores': scores, 'labels': torch.arange(len(scores))}]
    cells = extractor.grid_cells()
    assert torch.equal(cells[7], torch.tensor([1, 1, 2, 2]) / 6)  # row 1, column 1
    assert torch.equal(extractor.detect(detector(torch.zeros(0, 4), torch.zeros(0)), img), cells)
    few = torch.tensor([[0, 0, 20, 10], [0, 0, 20, 9.], [20, 10, 40, 20]])  # 2nd: IoU 0.9 with the 1st
    got = extractor.detect(detector(few, torch.tensor([0.9, 0.8, 0.7])), img)
    assert torch.equal(got, torch.cat([few[[0, 2]] / scale, extractor.spread_cells(34)]))  # NMS, then cells
    assert torch.equal(extractor.spread_cells(5), cells[[0, 5, 14, 30, 35]])  # centre and corners, not the top row
    assert torch.equal(extractor.spread_cells(36), cells) and extractor.spread_cells(0).shape == (0, 4)
    for k in range(1, 37):  # any number of free slots: spread over the grid, each cell once
        spread = extractor.spread_cells(k)
        assert len(set(map(tuple, spread.tolist()))) == k
        rows = spread[:, 1] * 6
        assert k < 4 or (rows.min() == 0 and rows.max() == 5)  # 4 or more: the top and the bottom row
    many = torch.arange(40.)[:, None] * torch.tensor([1., 0, 1, 0]) + torch.tensor([0, 0, 0.5, 0.5])  # disjoint
    got = extractor.detect(detector(many, torch.arange(40.) / 40), img)
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
    assert sorted(os.listdir(world.data / 'a')) == ['test_image_names.txt', 'test_ims.json', 'test_ims.npy']


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
    assert sorted(os.listdir(world.data / 'k')) == ['test_image_names.txt', 'test_ims.json', 'test_ims.npy']


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
    features.main(argv(two / 'data', 'boxes', two / 'images', '--regions', 'boxes', '--batch_size', '2',
                       '--detector_size', '160'))  # smaller than the default 800: seconds on a CPU
    check_boxes(ims(two / 'data', 'boxes'), ims(two / 'data', 'boxes', 'boxes'), 2)
    assert sorted(os.listdir(two / 'data' / 'boxes')) == ['test_boxes.npy', 'test_image_names.txt', 'test_ims.json',
                                                          'test_ims.npy']


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
    monkeypatch.setattr(extractor, 'build_detector', lambda *args: FewBoxes())
    features.main(argv(two / 'data', 'few', two / 'images', '--regions', 'boxes'))
    feats, boxes = ims(two / 'data', 'few'), ims(two / 'data', 'few', 'boxes')
    check_boxes(feats, boxes, 2)
    expected = torch.cat([torch.tensor([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]), extractor.spread_cells(34)])
    for image_boxes in boxes:
        assert np.allclose(image_boxes, expected.numpy(), atol=1e-6)


# ---------------------------------------------------------------- issue 16: what users bring

def test_inputs_keep_the_aspect_and_the_detector_sees_its_training_scale(tmp_path):
    Image.fromarray(picture(500, 375)).save(tmp_path / 'a.jpg', quality=95)  # Flickr30K's usual size
    Image.fromarray(picture(1000, 200)).save(tmp_path / 'wide.png')  # 5:1, past the cap
    images = imagefiles.Images([str(tmp_path / 'a.jpg'), str(tmp_path / 'wide.png')], 448, 10 ** 6, 800)
    x, det = images[0]
    assert x.shape == (3, 448, 597) and x.dtype == torch.float32  # shorter side 448, 4:3 kept
    assert det.shape == (3, 800, 1067) and det.dtype == torch.uint8  # the detector's own scale
    x, det = images[1]  # the longer side capped at 1333/800 of the shorter side's size, the aspect kept
    assert x.shape == (3, 149, 746) and det.shape == (3, 267, 1333)
    detector = extractor.build_detector('none', 0, features.parse_args(
        argv('d', 'n', tmp_path, '--regions', 'boxes')).detector_size)
    assert detector.transform.min_size == (800,) and detector.transform.max_size == 1333  # as trained on COCO
    assert imagefiles.Images([str(tmp_path / 'a.jpg')], 448, 10 ** 6)[0][1] is None  # grid: no detector input


def test_a_box_feature_comes_from_that_box_area():
    """A real (random) trunk on a 128 x 320 picture: its map is 4 x 10 cells of 32 pixels. Every
    box of 2 x 2 cells, given in [0, 1] of the picture, pools (RoIAlign) to about the mean of those
    cells, nearer to them than to any other 2 x 2 cells: x and y each scaled by their own side."""
    trunk = extractor.build_trunk('none', 0)
    x = (torch.from_numpy(picture(320, 128, 9)).permute(2, 0, 1).float() / 255 - 0.45) / 0.23  # (3, 128, 320)
    with torch.inference_mode():
        fmap = trunk(x[None])[0].double()  # (2048, 4, 10)
        corners = [(r, c) for r in range(3) for c in range(9)]  # the 27 blocks of 2 x 2 cells
        means = torch.stack([fmap[:, r:r + 2, c:c + 2].mean((1, 2)) for r, c in corners])  # (27, 2048)
        boxes = torch.tensor([[c / 10, r / 4, (c + 2) / 10, (r + 2) / 4] for r, c in corners])  # (27, 4)
        boxes = torch.cat([boxes, boxes[:9]])  # (36, 4)
        pooled = extractor.regions(trunk, [x], [boxes])[0, :27].double()  # (27, 2048)
    assert fmap.shape == (2048, 4, 10)
    dist = torch.cdist(pooled, means)  # (27 boxes, 27 blocks)
    assert torch.equal(dist.argmin(1), torch.arange(27))  # each box's feature: nearest to its own cells
    spread = (means - means.mean(0)).norm(dim=1).mean()
    assert (dist.diag() < 0.35 * spread).all()  # and near them: RoIAlign's bilinear samples reach past the edges


def test_a_grid_run_removes_the_boxes_of_the_boxes_run_it_replaces_and_pages_use_boxes_of_their_features(two):
    data, folder = two / 'data', two / 'data' / 'stale'
    dataset = SimpleNamespace(caps_path=str(folder / 'test_caps.txt'), split='test', n_images=2)
    boxes_run = argv(data, 'stale', two / 'images', '--regions', 'boxes', '--detector_size', '64')
    features.main(boxes_run)
    made = ims(data, 'stale', 'boxes').copy()
    record = json.loads((folder / 'test_ims.json').read_text())
    assert record['settings']['regions'] == 'boxes' and record['settings']['detector_size'] == 64
    assert np.array_equal(featstore.boxes_for(str(folder), 'test'), made)  # they belong: the pages use them
    np.testing.assert_array_equal(report.read_boxes(dataset, 36), made)
    old_ims = (folder / 'test_ims.npy').read_bytes()

    features.main(argv(data, 'stale', two / 'images', '--overwrite'))  # grid features replace them
    assert sorted(os.listdir(folder)) == ['test_image_names.txt', 'test_ims.json', 'test_ims.npy']  # boxes gone
    assert json.loads((folder / 'test_ims.json').read_text())['settings']['regions'] == 'grid'
    np.save(folder / 'test_boxes.npy', made)  # the old boxes back, as earlier versions left them
    assert featstore.boxes_for(str(folder), 'test') is None and report.read_boxes(dataset, 36) is None

    features.main(boxes_run[:-2] + ['--detector_size', '64', '--overwrite'])  # boxes again, then other features
    assert np.array_equal(report.read_boxes(dataset, 36), made)
    (folder / 'test_ims.npy').write_bytes(old_ims[:-4] + b'\0\0\0\0')  # features copied over, one value changed
    assert report.read_boxes(dataset, 36) is None
    os.remove(folder / 'test_ims.json')  # no record (boxes made by other tools): the boxes file as it is
    assert np.array_equal(report.read_boxes(dataset, 36), made)
    (folder / 'test_ims.json').write_text('{"settings": 1}')
    with pytest.raises(ValueError, match=f'{folder / "test_ims.json"}: not a settings record of features.py'):
        report.read_boxes(dataset, 36)
    os.remove(folder / 'test_ims.json')


def test_the_settings_record_holds_what_made_the_features(world):
    record = json.loads((world.data / 'a' / 'test_ims.json').read_text())
    settings = record['settings']
    assert settings['recipe'] == extractor.RECIPE and settings['regions'] == 'grid' and settings['weights'] == 'none'
    assert settings['image_size'] == 64 and settings['batch_size'] == 3 and settings['seed'] == 0
    assert settings['detector'] is None and record['n_images'] == 7 and record['max_pixels'] == 64_000_000
    assert record['fingerprints'] == {'ims': featstore.fingerprint(str(world.data / 'a' / 'test_ims.npy')),
                                      'boxes': None}
    assert record['versions']['torch'] == torch.__version__


def test_a_partial_run_of_an_older_features_py_is_not_continued(tmp_path):
    images, folder = tmp_path / 'images', tmp_path / 'data' / 'n'
    images.mkdir()
    folder.mkdir(parents=True)
    Image.fromarray(picture(20, 20)).save(images / 'a.jpg')
    args = features.parse_args(argv(tmp_path / 'data', 'n', images))
    old = features._settings(args, ['a.jpg'], torch.device('cpu'))
    del old['recipe']  # what features.py wrote before its inputs kept their aspect
    np.lib.format.open_memmap(folder / 'test_ims.npy.partial', 'w+', np.float32, (1, 36, 2048))
    (folder / 'test_ims.npy.partial.json').write_text(json.dumps({'settings': old, 'done': 0}))
    message = refused(argv(tmp_path / 'data', 'n', images))
    assert 'partial run made with other arguments (an older features.py, other features)' in message


@pytest.fixture(scope='module')
def huge(tmp_path_factory):
    """A 13000 x 13000 single-colour PNG: 169 megapixels in 46 KB, past Pillow's warning (89 MP) and
    under its error (179 MP). Made once (2 s, 180 MB while made)."""
    path = tmp_path_factory.mktemp('huge') / 'huge.png'
    Image.new('1', (13000, 13000), 1).save(path)
    return path


def test_a_huge_image_is_refused_in_one_line_naming_it_without_pillows_warning(huge, tmp_path):
    images = tmp_path / 'images'
    images.mkdir()
    Image.fromarray(picture(20, 20)).save(images / 'a.jpg')
    (images / 'huge.png').write_bytes(huge.read_bytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        message = refused(argv(tmp_path / 'data', 'n', images))
    assert '1 of 2 images' in message and 'nothing written' in message
    assert 'huge.png (13000 x 13000 = 169.0 megapixels, over --max_pixels 64000000)' in message
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert os.listdir(tmp_path / 'data' / 'n') == []


def test_large_jpegs_decode_at_a_reduced_size_within_max_pixels(tmp_path):
    Image.fromarray(picture(400, 300)).resize((4000, 3000)).save(tmp_path / 'big.jpg', quality=90)
    Image.new('RGB', (4000, 3000), (200, 30, 40)).save(tmp_path / 'big.png')  # one colour: quick to write
    img = imagefiles.load_rgb(str(tmp_path / 'big.jpg'), 10 ** 6, short=448)
    assert img.size == (1000, 750) and img.mode == 'RGB'  # 1/4: the shorter side still >= 448 (1/8: 375)
    assert imagefiles.load_rgb(str(tmp_path / 'big.jpg'), 0, short=800).size == (2000, 1500)
    with pytest.raises(ValueError, match=r'^4000 x 3000 = 12.0 megapixels, over --max_pixels 1000000$'):
        imagefiles.load_rgb(str(tmp_path / 'big.png'), 10 ** 6, short=448)  # a PNG has no reduced decoding
    (tmp_path / 'data' / 'n').mkdir(parents=True)
    (tmp_path / 'data' / 'n' / 'test_image_names.txt').write_text('big.jpg\nbig.png\n')
    message = refused(argv(tmp_path / 'data', 'n', tmp_path, '--max_pixels', '1000000'))
    assert message.endswith('nothing written: big.png (4000 x 3000 = 12.0 megapixels, over --max_pixels 1000000)')


def test_one_timing_covers_the_whole_run_and_every_phase_is_announced(tmp_path, capsys):
    images = tmp_path / 'images'
    images.mkdir()
    Image.fromarray(picture(20, 20)).save(images / 'a.jpg')
    started = time.time() - 2  # as the script passes it: its start, before torch's import
    features.main(argv(tmp_path / 'data', 'n', images), started=started)
    wall = time.time() - started
    out, err = capsys.readouterr()
    total, spans = re.fullmatch(r'1 images in ([\d.]+) s, the whole run \((.*)\); [\d.]+ images/s in the features '
                                r'phase: .*test_ims.npy\n', out).groups()
    parts = {name: float(t) for name, t, _ in (span.rsplit(' ', 2) for span in spans.split(', '))}
    assert list(parts) == ['start-up', 'setup', 'disk', 'models', 'image check', 'features', 'finish']
    assert parts['start-up'] >= 1.95 and abs(sum(parts.values()) - float(total)) <= 0.05 * len(parts)
    assert wall - 0.1 <= float(total) <= wall + 0.05  # the whole run: no phase left out
    lines = ['reserving the output on disk', 'loading ResNet-152 (--weights none)', 'checking 1 images',
             'computing the features of 1 images on cpu', 'fingerprinting and renaming into place']
    at = [err.find(line) for line in lines]
    assert -1 not in at and at == sorted(at), err  # each announced as it starts: no silent phase


def test_a_full_disk_is_found_before_any_work_in_one_line_and_earlier_files_stay(tmp_path):
    """A real 1 MB filesystem (tmpfs, mounted as root): 7 images need 2 MB of features."""
    disk = tmp_path / 'disk'
    disk.mkdir()
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f'cannot mount a 1 MB tmpfs to fill (needs root): {mounted.stderr.strip()}')
    try:
        images, folder = make_images(tmp_path / 'images'), disk / 'n'
        folder.mkdir()
        np.save(folder / 'dev_ims.npy', np.ones((1, 36, 2048), np.float32))  # an earlier split, 295 KB
        (folder / 'test_image_names.txt').write_text(''.join(f'{name}\n' for name in NAMES))
        before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
        run = subprocess.run([sys.executable, os.path.join(ROOT, 'features.py'), *argv(disk, 'n', images)],
                             capture_output=True, text=True, env=ENV, timeout=600)
        assert run.returncode == 1, (run.returncode, run.stderr[-2000:])  # not -7: SIGBUS
        last = run.stderr.strip().splitlines()[-1]
        assert re.fullmatch(rf'error: {folder}/test_ims.npy.partial: no space left on that disk for the output '
                            r'\(2.1 MB for 7 images, 0.[67]\d* MB free there\): nothing computed, the files already '
                            r'there are intact', last), last
        assert 'loading ResNet-152' not in run.stderr and 'checking' not in run.stderr  # found first
        assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    finally:
        subprocess.run(['umount', str(disk)], check=True)
