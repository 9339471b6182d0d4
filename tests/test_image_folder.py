"""Training on your own images (ldm/data/folder.py): captions from name.txt or diffusers'
metadata.jsonl, center crop and resize (against PIL's own BICUBIC), every PIL mode through
ldm.images, EXIF orientation, the failures (unreadable, uncaptioned, too small), and the
latent cache (keyed by image content, resolution and encoder)."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.config import PRESETS
from ldm.data.folder import ImageFolder, LatentCache, collate
from ldm.models.vae import AutoencoderKL

from helpers import randomize_


def random_image(width, height, mode="RGB", seed=None):
    """A smooth random picture (noise blurred by a bilinear upscale), so resampling differences
    are not dominated by single-pixel noise."""
    g = np.random.default_rng(seed)
    small = Image.fromarray((g.random((height // 4 + 2, width // 4 + 2, 3)) * 255).astype(np.uint8))
    return small.resize((width, height), Image.BILINEAR).convert(mode)


def add(folder, name, image, caption=None):
    image.save(folder / name)
    if caption is not None:
        (folder / name).with_suffix(".txt").write_text(caption + "\n")
    return folder / name


def test_images_and_captions_in_the_txt_layout(tmp_path):
    add(tmp_path, "b.png", random_image(80, 60, seed=1), "a red circle")
    add(tmp_path, "a.jpg", random_image(64, 64, seed=2), "  a blue square ")
    (tmp_path / "sub").mkdir()
    add(tmp_path / "sub", "c.png", random_image(70, 90, "RGBA", seed=3), "a green triangle")
    (tmp_path / ".hidden").mkdir()
    add(tmp_path / ".hidden", "d.png", random_image(64, 64, seed=4))  # no caption: not read
    data = ImageFolder(tmp_path, 32)
    assert [p.relative_to(tmp_path).as_posix() for p, _ in data.items] == [
        "a.jpg", "b.png", "sub/c.png"]
    item = data[1]
    assert item["caption"] == "a red circle" and item["path"] == tmp_path / "b.png"
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert data[0]["caption"] == "a blue square"
    batch = collate([data[i] for i in range(3)])
    assert batch.images.shape == (3, 3, 32, 32) and batch.latents is None
    assert -1 <= batch.images.min() and batch.images.max() <= 1
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=collate)
    assert [len(b.captions) for b in loader] == [2, 1]


@pytest.mark.parametrize("size, resolution", [((120, 90), 32), ((90, 120), (24, 40)),
                                              ((64, 64), 64), ((101, 77), (48, 16))])
def test_center_crop_and_resize_match_pil(tmp_path, size, resolution):
    """The output is the centre of PIL's BICUBIC resize (PIL's own filter, not ours), run on
    each channel in PIL's float mode "F" so that it rounds nothing."""
    image = random_image(*size, seed=int(torch.randint(1 << 20, ())))
    add(tmp_path, "x.png", image, "x")
    out = ImageFolder(tmp_path, resolution)[0]["image"]
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    scale = max(width / size[0], height / size[1])
    new_w, new_h = max(width, round(size[0] * scale)), max(height, round(size[1] * scale))
    left, top = (new_w - width) // 2, (new_h - height) // 2
    channels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1
    ref = torch.from_numpy(np.stack([np.asarray(
        Image.fromarray(c, mode="F").resize((new_w, new_h), Image.BICUBIC).crop(
            (left, top, left + width, top + height))) for c in channels])).clamp(-1, 1)
    assert out.shape == ref.shape
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_every_mode_on_its_own_scale(tmp_path):
    """16-bit grey white is white, transparency is composited on white (ldm.images' rules)."""
    add(tmp_path, "grey16.png", Image.new("I;16", (40, 40), 65535), "white")
    transparent = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    add(tmp_path, "alpha.png", transparent, "nothing on white")
    add(tmp_path, "palette.png", Image.new("P", (40, 40), 0), "black")
    data = ImageFolder(tmp_path, 32)
    by_name = {p.name: data[i]["image"] for i, (p, _) in enumerate(data.items)}
    white = torch.ones(3, 32, 32)
    torch.testing.assert_close(by_name["grey16.png"], white, rtol=0, atol=1e-6)
    torch.testing.assert_close(by_name["alpha.png"], white, rtol=0, atol=1e-6)
    torch.testing.assert_close(by_name["palette.png"], -white, rtol=0, atol=1e-6)


def test_exif_orientation_turns_the_picture_upright(tmp_path):
    upright = random_image(40, 60, seed=5)                # what the camera's user saw
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 60 wide, 40 high, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    stored.save(tmp_path / "photo.png", exif=exif)
    (tmp_path / "photo.txt").write_text("a photo")
    (tmp_path / "ref").mkdir()
    add(tmp_path / "ref", "upright.png", upright, "a photo")
    out = ImageFolder(tmp_path, (60, 40))  # tall: fits only the upright picture
    assert not out.skipped
    assert torch.equal(out[0]["image"], ImageFolder(tmp_path / "ref", (60, 40))[0]["image"])


def test_batches_know_each_images_original_size_and_crop(tmp_path):
    """SDXL's size conditioning: ImageFolder.batch gives each image's upright (h, w) before
    resizing and the (top, left) of its centred crop in the resized image (worked out by hand:
    60×40 upright -> 48×32, crop from row 8; 50×90 -> 32×58 (57.6 rounded), from column 13)."""
    stored = random_image(40, 60, seed=6).transpose(Image.Transpose.ROTATE_90)  # 60 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # upright it is 60 high, 40 wide, as random_image made it
    stored.save(tmp_path / "turned.png", exif=exif)
    (tmp_path / "turned.txt").write_text("turned")
    add(tmp_path, "wide.png", random_image(90, 50, seed=7), "wide")
    add(tmp_path, "square.png", random_image(32, 32, seed=8), "square")
    data = ImageFolder(tmp_path, 32)
    expected = {"turned": ((60, 40), (8, 0)), "wide": ((50, 90), (0, 13)),
                "square": ((32, 32), (0, 0))}
    batch = data.batch(5, torch.Generator().manual_seed(int(torch.randint(1 << 20, ()))))
    assert [(o, c) for o, c in zip(batch.original_sizes, batch.crop_coords)] == \
        [expected[caption] for caption in batch.captions]
    half = data.batch(3, torch.Generator().manual_seed(0), part=slice(1, 2))
    assert len(half.original_sizes) == len(half.crop_coords) == len(half.captions) == 1
    assert collate([data[0]]).original_sizes is None  # a DataLoader's batches do not know


def test_metadata_jsonl_layout(tmp_path):
    (tmp_path / "train").mkdir()
    for name in ("a.png", "b.png"):
        random_image(40, 40).save(tmp_path / "train" / name)
    add(tmp_path, "c.png", random_image(40, 40), "from its text file")
    (tmp_path / "train" / "b.txt").write_text("the text file loses")
    lines = [{"file_name": "a.png", "text": "first", "other": 1},
             {"file_name": "b.png", "text": "second"}]
    (tmp_path / "train" / "metadata.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    data = ImageFolder(tmp_path, 32)
    assert [caption for _, caption in data.items] == ["from its text file", "first", "second"]


@pytest.mark.parametrize("line, message", [
    ('{"file_name": "a.png"}', r'metadata.jsonl:2: each line must be an object with a '
                               r'"file_name" and a "text"'),
    ('{"file_name": "zz.png", "text": "x"}', r"metadata.jsonl:2: file_name 'zz.png': there is no"),
    ('{"file_name": "a.png", "text": ', r"metadata.jsonl:2: not JSON"),
])
def test_a_bad_metadata_line_is_named(tmp_path, line, message):
    random_image(40, 40).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n' + line)
    with pytest.raises(ValueError, match=message):
        ImageFolder(tmp_path, 32)


def test_an_image_without_caption_is_named(tmp_path):
    add(tmp_path, "a.png", random_image(40, 40), "captioned")
    add(tmp_path, "lonely.png", random_image(40, 40))
    with pytest.raises(ValueError, match=r"image .*lonely.png has no caption: no lonely.txt"):
        ImageFolder(tmp_path, 32)
    data = ImageFolder(tmp_path, 32, default_caption="")
    assert [caption for _, caption in data.items] == ["captioned", ""]


def test_small_images_are_skipped_with_a_warning_and_a_count(tmp_path):
    add(tmp_path, "big.png", random_image(64, 48), "big")
    add(tmp_path, "narrow.png", random_image(31, 100), "narrow")
    add(tmp_path, "low.png", random_image(100, 20), "low")
    with pytest.warns(UserWarning, match=r"2 of 3 images are smaller than 32×32 and are "
                                         r"skipped: low.png \(100×20\), narrow.png \(31×100\)"):
        data = ImageFolder(tmp_path, 32)
    assert len(data) == 1 and [p.name for p, _ in data.skipped] == ["low.png", "narrow.png"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="holds no image of at least 128×128"):
            ImageFolder(tmp_path, 128)


def test_unreadable_images_are_named(tmp_path):
    add(tmp_path, "good.png", random_image(40, 40), "good")
    (tmp_path / "junk.png").write_bytes(b"not a picture at all")
    (tmp_path / "junk.txt").write_text("junk")
    with pytest.raises(OSError, match=r"cannot read image .*junk.png"):
        ImageFolder(tmp_path, 32)
    (tmp_path / "junk.png").unlink()
    random_image(64, 64, seed=1).save(tmp_path / "junk.jpg", quality=95)
    whole = (tmp_path / "junk.jpg").read_bytes()
    (tmp_path / "junk.jpg").write_bytes(whole[:len(whole) // 2])  # cut short in its pixels
    data = ImageFolder(tmp_path, 32)  # its header reads
    with pytest.raises(OSError, match=r"cannot read image .*junk.jpg: image file is truncated"):
        data[1]
    with pytest.raises(NotADirectoryError, match="nowhere"):
        ImageFolder(tmp_path / "nowhere", 32)


def test_batch_draws_distinct_images_reproducibly(tmp_path):
    for i in range(5):
        add(tmp_path, f"{i}.png", random_image(40, 40, seed=i), f"image {i}")
    data = ImageFolder(tmp_path, 32)
    batch = data.batch(4, torch.Generator().manual_seed(3))
    assert batch.images.shape == (4, 3, 32, 32) and len(set(batch.captions)) == 4
    again = data.batch(4, torch.Generator().manual_seed(3))
    assert again.captions == batch.captions and torch.equal(again.images, batch.images)
    assert sorted(data.batch(10, torch.Generator()).captions) == sorted(
        [f"image {i}" for i in range(5)] * 2)
    generator = torch.Generator().manual_seed(3)
    half = data.batch(4, generator, part=slice(2, 4))  # a rank's share of the same draw
    assert half.captions == batch.captions[2:] and torch.equal(half.images, batch.images[2:])
    after = torch.Generator().manual_seed(3)
    data.batch(4, after)
    assert torch.equal(generator.get_state(), after.get_state())  # advanced alike


@pytest.fixture
def vae():
    return randomize_(AutoencoderKL(PRESETS["tiny"].vae), seed=int(torch.randint(1 << 20, ())))


def test_latent_cache_holds_the_vae_posterior(tmp_path, vae):
    (tmp_path / "img").mkdir()
    for i in range(3):
        add(tmp_path / "img", f"{i}.png", random_image(48, 40, seed=i), f"image {i}")
    cache = LatentCache.for_vae(tmp_path / "cache", vae)
    data = ImageFolder(tmp_path / "img", 32, latents=cache)
    assert data.cache_latents(batch_size=2) == 3
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    item = data[1]
    assert set(item) == {"latent", "caption", "path"}
    images = ImageFolder(tmp_path / "img", 32)[1]["image"][None]
    with torch.no_grad():
        posterior = vae.encode(images)
    expected = torch.cat([posterior.mean, posterior.logvar], dim=1)[0]
    assert item["latent"].shape == expected.shape
    assert ((item["latent"] - expected).norm() / expected.norm()).item() < 1e-5
    assert collate([data[0], data[1]]).latents.shape == (2, *expected.shape)
    assert data.cache_latents() == 0  # all there


def test_latent_cache_key_follows_image_resolution_and_encoder(tmp_path):
    calls = []

    def encode(images):  # (B, 3, H, W) -> (B, 2): a count of calls and a fingerprint
        calls.append(len(images))
        return images.mean(dim=(2, 3))[:, :2].clone()
    (tmp_path / "img").mkdir()
    path = add(tmp_path / "img", "a.png", random_image(48, 48, seed=1), "a")
    add(tmp_path / "img", "b.png", random_image(48, 48, seed=2), "b")
    cache = LatentCache(tmp_path / "cache", encode, "test-encoder")
    first = ImageFolder(tmp_path / "img", 32, latents=cache)[0]["latent"]
    assert calls == [1]
    again = ImageFolder(tmp_path / "img", 32, latents=cache)[0]["latent"]
    assert calls == [1] and torch.equal(first, again)  # read from disk, not encoded again
    ImageFolder(tmp_path / "img", 40, latents=cache)[0]
    assert calls == [1, 1]                             # another resolution: another key
    ImageFolder(tmp_path / "img", 32, latents=LatentCache(tmp_path / "cache", encode, "other"))[0]
    assert calls == [1, 1, 1]                          # another encoder: another key
    random_image(48, 48, seed=3).save(path)            # the image edited in place
    changed = ImageFolder(tmp_path / "img", 32, latents=cache)[0]["latent"]
    assert calls == [1, 1, 1, 1] and not torch.equal(changed, first)
    with pytest.raises(ValueError, match="encoder_id must name the encoder"):
        LatentCache(tmp_path / "cache", encode, "")
    assert not list((tmp_path / "cache").glob(".*"))  # no temporary files left


@pytest.mark.slow  # two optimisation steps of the tiny model: ~30 s on a shared 2-core machine
def test_ldm_train_takes_a_folder(tmp_path):
    """The interface ldm.train consumes: data(batch_size, generator) -> .images, .captions."""
    from ldm import train, training

    for i in range(4):
        add(tmp_path, f"{i}.png", random_image(80, 64, seed=i), f"a picture {i}")
    data = ImageFolder(tmp_path, 32)
    config = training.TrainConfig(vae_steps=1, vae_batch=2, steps=1, batch=2, warmup=1,
                                  checkpoint_every=10)
    state = train.train(PRESETS["tiny"], config, data.batch, progress=False)
    assert state.step == 2 and state.pipe.scale_factor > 0
