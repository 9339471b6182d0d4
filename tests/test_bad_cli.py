"""The command line under hostile input (issue 14): every user error is one line on stderr and an
exit code (2: the command line cannot work, 1: the run failed, 130: Ctrl-C), found before the
model loads where it can be; nothing is written or overwritten, no temporary file stays; each
image of a run gets its own file and records its own seed.

On the tiny preset with random weights, 32×32 images: these check the command, not the model.
"""
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import ldm
from ldm import cli
from ldm.config import PRESETS

from helpers import randomize_

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "python -m ldm txt2img: "


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    pipe = ldm.StableDiffusion(PRESETS["tiny"])
    for i, module in enumerate(pipe.networks().values()):
        randomize_(module, 100 + i)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    ldm.save(pipe.eval(), path)
    return path


@pytest.fixture
def no_load(monkeypatch):
    """The model must not load: these errors are found before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a user error reached the model load")
    monkeypatch.setattr(cli, "load", refuse)


def txt2img(ckpt, out, *more):
    return ["txt2img", "a red circle", "--ckpt", str(ckpt), "--steps", "2", "--height", "32",
            "--width", "32", "--no-progress", "--out", str(out), *more]


def run(capsys, argv):
    """(exit code, the lines on stderr) of the command `python -m ldm` runs."""
    code = cli.run(argv)
    return code, capsys.readouterr().err.splitlines()


def listing(directory):
    return sorted(p.name for p in Path(directory).iterdir())


# ---------------------------------------------------------------- found before loading
@pytest.mark.parametrize("more, message", [
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--steps", "5000"], "argument --steps: no sampler takes more than 1000, got 5000"),
    (["--steps", "1000", "--sampler", "ddim"], "argument --steps: steps must be an integer in "
     "[1, 999] for sampler 'ddim', got 1000"),
    (["--steps", "1000", "--config", "tiny"], "argument --steps: steps must be an integer in "
     "[1, 999] for sampler 'ddim', got 1000"),
    (["--steps", "60", "--sampler", "lcm"], "argument --steps: steps must be an integer in "
     "[1, 50] for sampler 'lcm', got 60"),
    (["--sampler", "ddim", "--schedule", "karras"], "argument --schedule: sampler 'ddim' steps "
     "through 'ddim_uniform', not 'karras'"),
    (["--sampler", "euler_karras", "--schedule", "simple"], "argument --schedule: sampler "
     "'euler_karras' already names schedule 'karras', but schedule='simple' was given"),
    (["--num-images", "0"], "argument --num-images: must be at least 1, got 0"),
    (["--num-images", "-3"], "argument --num-images: must be at least 1, got -3"),
    (["--height", "30"], "argument --height: must be a positive multiple of 8, got 30"),
    (["--width", "0"], "argument --width: must be a positive multiple of 8, got 0"),
    # the library's own rules (ldm.arguments), checked before the load
    (["--cfg-scale", "nan"], "argument --cfg-scale: cfg_scale must be in [-100, 100]"),
    (["--cfg-scale", "750"], "argument --cfg-scale: cfg_scale must be in [-100, 100]"),
    (["--eta", "-1"], "argument --eta: eta must be in [0, 1]"),
    (["--eta", "1.5"], "argument --eta: eta must be in [0, 1]"),
    (["--device", "bogus"], "argument --device: Expected one of"),
    (["--steps", "x"], "argument --steps: invalid int value: 'x'"),  # argparse's own, one line
])
def test_bad_values_exit_2_before_loading(ckpt, tmp_path, capsys, no_load, more, message):
    code, err = run(capsys, txt2img(ckpt, tmp_path / "m.png", *more))
    assert code == 2 and len(err) == 1 and err[0].startswith(PREFIX + "error: " + message)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("seed, images", [(-1, 1), (2**64, 1), (2**64 - 1, 2), (10**30, 1)])
def test_seeds_outside_torch_range_are_refused_naming_seed(ckpt, tmp_path, capsys, no_load,
                                                          seed, images):
    """Seeds are kept as given, never reduced: seed + i must lie in torch's [0, 2**64)."""
    code, err = run(capsys, txt2img(ckpt, tmp_path / "m.png", "--seed", str(seed),
                                    "--num-images", str(images)))
    assert code == 2 and err == [
        f"{PREFIX}error: argument --seed: must be in [0, 2**64 - {images}] (image i takes "
        f"seed + i, below 2**64; leave --seed out for a random one), got {seed}"]


def test_the_last_seeds_of_the_range_are_kept(ckpt, tmp_path, capsys):
    out = tmp_path / "m.png"
    assert cli.run(txt2img(ckpt, out, "--seed", str(2**64 - 2), "--num-images", "2")) == 0
    seeds = [Image.open(p).text["seed"] for p in (out, tmp_path / "m-1.png")]
    assert seeds == [str(2**64 - 2), str(2**64 - 1)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_exits_2_before_loading(ckpt, tmp_path, capsys, no_load):
    code, err = run(capsys, txt2img(ckpt, tmp_path / "m.png", "--device", "cuda"))
    assert code == 2 and err == [f"{PREFIX}error: argument --device: 'cuda' asked for, but "
                                 "this torch sees no cuda device"]


def test_img2img_strength_out_of_range(ckpt, tmp_path, capsys, no_load):
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    for strength in ("0", "1.5", "nan"):
        code, err = run(capsys, ["img2img", "x", "--image", str(tmp_path / "in.png"),
                                 "--strength", strength, "--ckpt", str(ckpt)])
        assert code == 2 and len(err) == 1 and err[0].startswith(
            "python -m ldm img2img: error: argument --strength: strength must be in (0, 1]")
        assert err[0].endswith(f"got {float(strength)}")


def test_a_16_bit_image_reaches_the_pipeline_in_its_own_mode(ckpt, tmp_path, monkeypatch):
    """The CLI hands the decoded image to ldm.images unconverted: a 16-bit grey PNG at mid grey
    must not arrive clipped to white, as PIL's convert("RGB") would make it."""
    import numpy as np
    grey = Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16))
    grey.save(tmp_path / "in.png")
    seen = []
    monkeypatch.setattr(ldm.StableDiffusion, "img2img",
                        lambda self, image, prompt, **kw: seen.append(image) or [image.convert("RGB")])
    assert cli.run(["img2img", "x", "--image", str(tmp_path / "in.png"), "--ckpt", str(ckpt),
                    "--out", str(tmp_path / "m.png"), "--no-progress"]) == 0
    pixels = ldm.images.to_tensor(seen[0])
    assert seen[0].mode.startswith("I") and abs(pixels.mean().item()) < 0.01  # mid grey, not 1


def test_missing_files_exit_2_before_loading(ckpt, tmp_path, capsys, no_load):
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    code, err = run(capsys, txt2img(tmp_path / "none.safetensors", tmp_path / "m.png"))
    assert (code, err) == (2, [f"{PREFIX}error: argument --ckpt: "
                               f"{tmp_path / 'none.safetensors'} does not exist"])
    code, err = run(capsys, txt2img(tmp_path, tmp_path / "m.png"))
    assert (code, err) == (2, [f"{PREFIX}error: argument --ckpt: {tmp_path} is a directory"])
    code, err = run(capsys, ["inpaint", "x", "--image", str(tmp_path / "in.png"), "--mask",
                             str(tmp_path / "mask.png"), "--ckpt", str(ckpt)])
    assert (code, err) == (2, [f"python -m ldm inpaint: error: argument --mask: "
                               f"{tmp_path / 'mask.png'} does not exist"])
    assert listing(tmp_path) == ["in.png"]


# ---------------------------------------------------------------- --out, checked first
@pytest.mark.parametrize("name, message", [
    ("m.jpg", "must name a .png file, got {d}/m.jpg"),
    ("none/m.png", "directory {d}/none does not exist"),
    ("file.txt/m.png", "directory {d}/file.txt is not a directory"),
    ("dir.png", "{d}/dir.png is a directory"),
])
def test_unusable_out_exits_2_before_loading(ckpt, tmp_path, capsys, no_load, name, message):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "dir.png").mkdir()
    code, err = run(capsys, txt2img(ckpt, tmp_path / name))
    assert code == 2 and err == [f"{PREFIX}error: argument --out: "
                                 + message.format(d=tmp_path)]
    assert listing(tmp_path) == ["dir.png", "file.txt"]


def test_read_only_out_directory_exits_2_before_loading(ckpt, tmp_path, capsys, no_load,
                                                        monkeypatch):
    """Root writes through chmod, so the directory refuses through os.open as a read-only
    mount would (EROFS); a chmod-ed one is tried too where the tests do not run as root."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    if os.geteuid() != 0:
        read_only.chmod(0o555)
        message = "Permission denied"
    else:
        real_open = os.open

        def refuse(path, *args, **kwargs):
            if Path(path).parent == read_only:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, *args, **kwargs)
        monkeypatch.setattr(os, "open", refuse)
        message = os.strerror(errno.EROFS)
    code, err = run(capsys, txt2img(ckpt, read_only / "m.png"))
    assert code == 2 and err == [f"{PREFIX}error: argument --out: cannot write in {read_only}: "
                                 f"{message}"]
    read_only.chmod(0o755)
    assert listing(read_only) == []


# ---------------------------------------------------------------- failures while running
class NotATensor:
    """A class a checkpoint's pickle may not ask for."""


def test_corrupt_refused_and_misshapen_checkpoints_exit_1(ckpt, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    refused = tmp_path / "refused.ckpt"
    torch.save({"state_dict": {}, "extra": NotATensor()}, refused)
    for path, problem in [(corrupt, "is not a readable safetensors file"),
                          (refused, "refused")]:
        code, err = run(capsys, txt2img(path, tmp_path / "m.png"))
        assert code == 1 and len(err) == 1
        assert err[0].startswith(f"{PREFIX}error: argument --ckpt: {path}: {problem}")
    code, err = run(capsys, txt2img(ckpt, tmp_path / "m.png", "--config", "sd15"))
    assert code == 1 and len(err) == 1 and "argument --ckpt" in err[0] and "shape" in err[0]
    assert listing(tmp_path) == ["corrupt.safetensors", "refused.ckpt"]


def test_unreadable_images_exit_1_before_loading(ckpt, tmp_path, capsys, no_load, monkeypatch):
    (tmp_path / "junk.png").write_bytes(b"not a png")
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    code, err = run(capsys, ["img2img", "x", "--image", str(tmp_path / "junk.png"),
                             "--ckpt", str(ckpt), "--out", str(tmp_path / "m.png")])
    assert code == 1 and len(err) == 1 and err[0].startswith(
        f"python -m ldm img2img: error: argument --image: cannot read image "
        f"{tmp_path / 'junk.png'}: cannot identify image file")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32×32 is then a decompression bomb
    code, err = run(capsys, ["img2img", "x", "--image", str(tmp_path / "in.png"),
                             "--ckpt", str(ckpt), "--out", str(tmp_path / "m.png")])
    assert code == 1 and len(err) == 1 and err[0].startswith(
        f"python -m ldm img2img: error: argument --image: cannot read image "
        f"{tmp_path / 'in.png'}: Image size (1024 pixels) exceeds limit")
    assert listing(tmp_path) == ["in.png", "junk.png"]


def test_argument_errors_found_by_the_model_exit_2(ckpt, tmp_path, capsys):
    """The model's own sampler is known once it is loaded: the pipeline's ValueError."""
    code, err = run(capsys, txt2img(ckpt, tmp_path / "m.png", "--schedule", "karras"))
    assert code == 2 and err == [f"{PREFIX}error: sampler 'ddim' steps through "
                                 "'ddim_uniform', not 'karras'"]
    assert listing(tmp_path) == []


def test_ctrl_c_exits_130(ckpt, tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "load", interrupt)
    assert run(capsys, txt2img(ckpt, tmp_path / "m.png")) == (130, [f"{PREFIX}interrupted"])
    assert listing(tmp_path) == []


@pytest.mark.parametrize("error, code, message", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (OSError(errno.ENOSPC, "No space left on device"), 1,
     "error: cannot write --out {out}: No space left on device"),
])
def test_a_failed_write_leaves_no_temporary_file(ckpt, tmp_path, capsys, monkeypatch, error,
                                                 code, message):
    """Disk full or Ctrl-C halfway through the PNG: the temporary file goes, the name stays free."""
    real_save = Image.Image.save

    def fail_halfway(image, path, *args, **kwargs):
        real_save(image, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:50])
        raise error
    monkeypatch.setattr(Image.Image, "save", fail_halfway)
    out = tmp_path / "m.png"
    assert run(capsys, txt2img(ckpt, out)) == (code, [PREFIX + message.format(out=out)])
    assert listing(tmp_path) == []


def test_debug_shows_the_traceback(ckpt, tmp_path, capsys, monkeypatch):
    with pytest.raises(cli.UsageError, match="argument --steps"):
        cli.run(txt2img(ckpt, tmp_path / "m.png", "--steps", "0", "--debug"))
    (tmp_path / "bad.ckpt").write_bytes(b"junk")
    with pytest.raises(ldm.CheckpointError, match="bad.ckpt"):
        cli.run(txt2img(tmp_path / "bad.ckpt", tmp_path / "m.png", "--debug"))
    monkeypatch.setattr(cli, "load", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        cli.run(txt2img(ckpt, tmp_path / "m.png", "--debug"))
    assert capsys.readouterr().err == ""


def test_errors_that_are_not_the_users_keep_their_traceback(ckpt, tmp_path, monkeypatch):
    """A bug is reported as one: the traceback, not a line that hides it."""
    monkeypatch.setattr(cli, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="bug"):
        cli.run(txt2img(ckpt, tmp_path / "m.png"))


def test_python_m_ldm_prints_one_line_and_the_exit_code(tmp_path):
    """The real entry point, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args, code, start in [(["--steps", "0"], 2, "argument --steps"),
                              (["--ckpt", str(tmp_path / "none.ckpt")], 2, "argument --ckpt")]:
        done = subprocess.run([sys.executable, "-m", "ldm", "txt2img", "x", *args, "--out",
                               str(tmp_path / "m.png")], env=env, capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)
        assert done.returncode == code and done.stdout == ""
        assert done.stderr.splitlines()[0].startswith(f"{PREFIX}error: {start}")
        assert len(done.stderr.splitlines()) == 1
    assert listing(tmp_path) == []


# ---------------------------------------------------------------- every image its own file
def test_concurrent_runs_into_one_name_keep_every_image(ckpt, tmp_path):
    """Two processes writing two images each to the same --out at the same time: four files,
    none replaced, each with the seed its PNG records, and no temporary file left."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [subprocess.Popen([sys.executable, "-m", "ldm", *txt2img(ckpt, tmp_path / "m.png"),
                              "--num-images", "2", "--seed", str(seed)], env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (10, 20)]
    written = []
    for process in runs:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        written += stdout.split()
    assert sorted(Path(p).name for p in written) == ["m-1.png", "m-2.png", "m-3.png", "m.png"]
    assert listing(tmp_path) == ["m-1.png", "m-2.png", "m-3.png", "m.png"]
    assert sorted(Image.open(p).text["seed"] for p in written) == ["10", "11", "20", "21"]


def test_each_image_of_a_run_gets_its_own_file_and_seed(ckpt, tmp_path, capsys):
    out = tmp_path / "m.png"
    names = [out, tmp_path / "m-1.png", tmp_path / "m-2.png"]
    assert cli.run(txt2img(ckpt, out, "--num-images", "3", "--seed", "5", "--overwrite")) == 0
    assert capsys.readouterr().out.splitlines() == [str(p) for p in names]
    first = [p.read_bytes() for p in names]
    assert len(set(first)) == 3
    for index, path in enumerate(names):
        text = Image.open(path).text
        assert (text["seed"], text["image_index"]) == (str(5 + index), str(index))
        assert f"Seed: {5 + index}, " in text["parameters"]
    # Without --overwrite, the series goes on: the taken names are kept.
    assert cli.run(txt2img(ckpt, out, "--num-images", "2", "--seed", "9")) == 0
    assert [p.read_bytes() for p in names] == first
    assert [Image.open(tmp_path / f"m-{n}.png").text["seed"] for n in (3, 4)] == ["9", "10"]
    # With it, exactly the first N names are replaced.
    assert cli.run(txt2img(ckpt, out, "--num-images", "2", "--seed", "20", "--overwrite")) == 0
    assert [Image.open(p).text["seed"] for p in names] == ["20", "21", "7"]
    assert listing(tmp_path) == ["m-1.png", "m-2.png", "m-3.png", "m-4.png", "m.png"]


def test_a_free_name_is_used_even_between_taken_ones(ckpt, tmp_path, capsys):
    (tmp_path / "m-1.png").write_bytes(b"kept")
    assert cli.run(txt2img(ckpt, tmp_path / "m.png", "--num-images", "2")) == 0
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "m.png"),
                                                    str(tmp_path / "m-2.png")]
    assert (tmp_path / "m-1.png").read_bytes() == b"kept"


def test_stale_temporary_files_of_dead_processes_are_removed(ckpt, tmp_path, capsys):
    """What SIGKILL leaves: a hidden `.m.png.<pid>@<host>.partial`, never a name of the series,
    removed by the next run when its process is gone (and only then, and only on its host)."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = cli._host()
    stale = tmp_path / f".m.png.{dead.pid}@{host}.partial"
    live = tmp_path / f".m.png.{os.getppid()}@{host}.partial"
    elsewhere = tmp_path / f".m.png.{dead.pid}@other-host.partial"
    for path in (stale, live, elsewhere):
        path.write_bytes(b"\x89PNG half")
    assert cli._TEMPORARY.match(cli._temporary(tmp_path / "m.png").name)
    assert cli.run(txt2img(ckpt, tmp_path / "m.png")) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'm.png'}\n"
    assert listing(tmp_path) == sorted([live.name, elsewhere.name, "m.png"])


def test_what_sigkill_leaves_is_removed_by_the_next_run(ckpt, tmp_path, capsys):
    """A process killed outright while writing its PNG: the next run removes the temporary file."""
    writer = (
        "import sys, time\n"
        "from PIL import Image\n"
        "from ldm import cli\n"
        "def slow(image, path, *args, **kwargs):\n"
        "    open(path, 'wb').write(b'\\x89PNG half')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        "Image.Image.save = slow\n"
        "cli.save_images([Image.new('RGB', (8, 8))], [{}], sys.argv[1])\n")
    process = subprocess.Popen([sys.executable, "-c", writer, str(tmp_path / "m.png")],
                               env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "writing\n"
    process.kill()
    process.wait()
    left = listing(tmp_path)
    assert left == [f".m.png.{process.pid}@{cli._host()}.partial"]
    assert cli.run(txt2img(ckpt, tmp_path / "m.png")) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'm.png'}\n"  # not counted as a name
    assert listing(tmp_path) == ["m.png"]
