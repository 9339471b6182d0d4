"""Writing images without losing any: the names of an output series, each PNG complete or absent.

The images of a run take the names of one series, out.png, out-1.png, out-2.png, … Each PNG is
written to a hidden temporary file `.out.png.<pid>@<host>.partial`, then linked (never
replacing a file that appeared meanwhile) or renamed (overwrite) into place; the temporary file
is removed on any error or Ctrl-C. What a process killed outright leaves is removed by the next
run in that directory (`remove_stale_temporaries`), never counted as a name of the series.
Used by the command line (`ldm.cli`) and by `ldm.generate`.
"""
import os
import re
import socket
from pathlib import Path

from PIL.PngImagePlugin import PngInfo


def series_name(out, number):
    """The name of image `number` of the --out series: out.png, out-1.png, out-2.png, …"""
    return out if number == 0 else out.with_name(f"{out.stem}-{number}{out.suffix}")


def save_images(images, texts, out, *, overwrite=False):
    """Write each image, with its text chunks, to its own name of the `out` series; returns
    the paths. overwrite: replace exactly the first len(images) names; else take free ones."""
    out, paths, number = Path(out), [], 0
    for index, (image, text) in enumerate(zip(images, texts)):
        if overwrite:
            path, number = _save(image, text, out, replace=series_name(out, index))
        else:
            path, number = _save(image, text, out, first=number)
            number += 1
        paths.append(path)
    return paths


def write_png(image, path, text, *, overwrite=False):
    """Save one image as `path` (replacing it with overwrite; else the next free name of its
    series), complete or not at all; returns the path written."""
    path = Path(path)
    return _save(image, text, path, replace=path if overwrite else None)[0]


def _save(image, text, out, *, replace=None, first=0):
    """Write a temporary file, then rename it onto `replace`, or link it to the first free name
    of the `out` series from number `first` (a link is atomic and fails rather than replace a
    file that appeared meanwhile). Returns (path, number); the temporary file never stays."""
    metadata = PngInfo()
    for key, value in text.items():
        metadata.add_text(key, value)
    tmp = _temporary(out)
    try:
        image.save(tmp, format="PNG", pnginfo=metadata)
        if replace is not None:
            os.replace(tmp, replace)
            return replace, first
        for number in range(first, first + 100000):
            try:
                os.link(tmp, series_name(out, number))
                return series_name(out, number), number
            except FileExistsError:
                continue
        raise FileExistsError(f"no free name in the series of {out}")
    except OSError as e:
        raise OSError(f"cannot write --out {replace or out}: {e.strerror or e}") from e
    finally:
        tmp.unlink(missing_ok=True)


# A temporary PNG: `.out.png.<pid>@<host>.partial`, hidden, and never a name of any series.
_TEMPORARY = re.compile(r"^\..+\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]*)\.partial$")


def _host():
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())


def _temporary(out):
    return out.with_name(f".{out.name}.{os.getpid()}@{_host()}.partial")


def remove_stale_temporaries(directory):
    """Remove the temporary PNGs of processes of this host that have ended (killed while
    writing); those of live processes, or of other hosts sharing the directory, stay."""
    for path in Path(directory).glob(".*.partial"):
        match = _TEMPORARY.match(path.name)
        if match and match["host"] == _host() and not _alive(int(match["pid"])):
            path.unlink(missing_ok=True)


def _alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or not a pid: leave its file
    return True
