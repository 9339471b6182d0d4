"""The CLIP tokenizer: parity with transformers' CLIPTokenizer (what the CompVis original calls)
and with OpenAI's SimpleTokenizer on 300+ prompts, known ids, truncation, shapes.

The references are built from the same OpenAI merges file that `ldm` ships: the test writes the
vocab.json / merges.txt pair exactly as openai/clip-vit-large-patch14's were made.
"""
import html
import importlib.util
import os
import random
import re
import unicodedata
import warnings
import zipfile
from pathlib import Path

import ftfy
import pytest
import torch

from ldm.tokenizer import CLIPTokenizer

from helpers import write_clip_vocab_files

START, END = 49406, 49407
HAND_WRITTEN = Path(__file__).parent / "data" / "prompts.txt"
# The wheel of open_clip_torch 3.3.0 (PyPI), which carries OpenAI's tokenizer.py.
# OpenAI's original tokenizer, read from the open_clip wheel that `make test` downloads (never
# installed: its package pulls in torchvision).
OPEN_CLIP_WHEEL = Path(os.environ.get(
    "OPEN_CLIP_WHEEL",
    Path(__file__).resolve().parents[1] / "build" / "reference" / "open_clip_torch-3.3.0-py3-none-any.whl"))

# Unicode blocks for random prompts: scripts, combining marks, punctuation, symbols, CJK,
# Hangul, ligatures, full-width forms, math letters, emoji, C0/C1 controls.
BLOCKS = [
    (0x00A0, 0x024F), (0x0300, 0x036F), (0x0370, 0x052F), (0x0590, 0x06FF), (0x0900, 0x097F),
    (0x0E00, 0x0E7F), (0x1E00, 0x1EFF), (0x2000, 0x206F), (0x2100, 0x22FF), (0x2460, 0x24FF),
    (0x2500, 0x27BF), (0x3000, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFB00, 0xFB4F),
    (0xFF00, 0xFFEF), (0x1D400, 0x1D7FF), (0x1F300, 0x1FAFF), (0x0000, 0x001F), (0x0080, 0x009F),
]
WORDS = "a photo of cat dog portrait by the in with detailed 8k (masterpiece:1.3) [red|blue] it's DON'T 3.5".split()
SPACES = [" ", "  ", "\t", "\n", "\r\n", " \n\t ", "\xa0", "\u3000", "\u2009", "\u2028", "\x0b", "\x0c", "\x1c", "\x85"]


def generated_prompts(seed=0):
    """Random prompts (fixed seed) plus the edge cases: empty, blank, the 77-token boundary, long."""
    rng = random.Random(seed)
    prompts = [_random_unicode(rng) for _ in range(80)]
    prompts += ["".join(chr(rng.randint(9, 126)) for _ in range(rng.randint(1, 60))) for _ in range(50)]
    prompts += [_word_salad(rng) for _ in range(50)]
    prompts += ["", " ", "\t\n", "\u3000"]
    for n in range(73, 79):  # "cat" is one token, so n words are n + 2 ids: 75, 76, 77, ... 80
        prompts += [" ".join(["cat"] * n), " ".join(["cat"] * (n - 1) + ["rutkowski"])]
    prompts.append(", ".join(["a very detailed painting of a beautiful woman"] * 20))
    prompts.append(" ".join(["🐱👨‍👩‍👧‍👦"] * 40))
    return prompts


def _random_unicode(rng):
    """1-8 'words' of code points drawn from 3 blocks; unassigned code points are left out, since
    the Rust and Python regex engines may know different Unicode versions."""
    blocks = rng.sample(BLOCKS, 3)
    words = []
    for _ in range(rng.randint(1, 8)):
        chars = [chr(rng.randint(*rng.choice(blocks))) for _ in range(rng.randint(1, 6))]
        words.append("".join(c for c in chars if unicodedata.category(c) != "Cn"))
    return rng.choice(SPACES).join(words)


def _word_salad(rng):
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 30))]
    return "".join((w.upper() if rng.random() < 0.2 else w) + rng.choice(SPACES) for w in words)


@pytest.fixture(scope="module")
def corpus():
    hand_written = HAND_WRITTEN.read_text(encoding="utf-8").removesuffix("\n").split("\n")
    prompts = hand_written + generated_prompts()
    assert len(prompts) >= 300
    return prompts


@pytest.fixture(scope="module")
def ours():
    return CLIPTokenizer()


def ids_quietly(tokenizer, prompts):
    """(B, 77) ids as lists, without the truncation warnings of the long prompts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tokenizer(prompts).tolist()


def assert_same(prompts, ours, theirs, reference):
    """ours[i] == theirs[i] for every prompt, else name the first prompts that differ."""
    bad = [i for i in range(len(prompts)) if ours[i] != theirs[i]]
    examples = "\n".join(f"{prompts[i]!r}\n  ours:   {ours[i]}\n  theirs: {theirs[i]}" for i in bad[:5])
    assert not bad, f"{len(bad)} of {len(prompts)} prompts differ from {reference}:\n{examples}"


# --- reference 1: transformers' CLIPTokenizer, called as the CompVis original calls it ---------

@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    """vocab.json + merges.txt from the merges file, as OpenAI's vocabulary was converted for the
    hub."""
    return write_clip_vocab_files(tmp_path_factory.mktemp("clip_vocab"))


def slow_clip_clean(text):
    """transformers 4.x slow CLIPTokenizer's clean-up: `whitespace_clean(ftfy.fix_text(text)).lower()`
    (`whitespace_clean` = `regex.sub(r"\\s+", " ", text).strip()`)."""
    import regex

    return regex.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()


def test_matches_transformers_clip_tokenizer(corpus, ours, vocab_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.CLIPTokenizer.from_pretrained(vocab_dir, pad_token="<|endoftext|>")
    prompts = texts = corpus
    if not hasattr(reference, "fix_text"):
        # transformers >= 5 dropped the slow, ftfy-based class that SD was trained and is run
        # with; what remains is Rust-backed, with NFC for ftfy and a case-sensitive split. So
        # give it the slow class's clean-up, and leave out the two characters where case-
        # insensitivity matters: U+0345 (dropped by the slow split) and "'ſ" (a contraction).
        prompts = [p for p in corpus if not re.search("\u0345|'ſ", slow_clip_clean(p))]
        texts = [slow_clip_clean(p) for p in prompts]
        assert len(prompts) >= len(corpus) - 10
    theirs = reference(texts, truncation=True, max_length=77, padding="max_length", return_tensors="pt")
    assert_same(prompts, ids_quietly(ours, prompts), theirs.input_ids.tolist(), "transformers")


# --- reference 2: OpenAI's SimpleTokenizer, as shipped in the open_clip wheel ------------------

@pytest.fixture(scope="module")
def openai(tmp_path_factory):
    """OpenAI's SimpleTokenizer, from that one file of the wheel: `import open_clip` would pull
    in torchvision."""
    if not OPEN_CLIP_WHEEL.exists():
        pytest.skip(f"no open_clip wheel at {OPEN_CLIP_WHEEL} (set OPEN_CLIP_WHEEL)")
    folder = tmp_path_factory.mktemp("open_clip")
    with zipfile.ZipFile(OPEN_CLIP_WHEEL) as wheel:
        for name in ("tokenizer.py", "bpe_simple_vocab_16e6.txt.gz"):
            wheel.extract(f"open_clip/{name}", folder)
    spec = importlib.util.spec_from_file_location("openai_clip_tokenizer", folder / "open_clip" / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def differs_by_design(prompt):
    """Where SD's tokenizer and OpenAI's part ways: OpenAI also runs html.unescape twice (for
    entities ftfy leaves, e.g. "&amp" without ";" or any entity in text with "<"), and open_clip
    renamed the special tokens to <start_of_text> / <end_of_text>."""
    fixed = ftfy.fix_text(prompt)
    return html.unescape(html.unescape(fixed)) != fixed or re.search(r"<\|(start|end)oftext\|>", fixed, re.I)


def test_matches_openai_simple_tokenizer(corpus, ours, openai):
    prompts = [p for p in corpus if not differs_by_design(p)]
    assert len(prompts) >= len(corpus) - 15
    assert_same(prompts, [ours.encode(p) for p in prompts], [openai.encode(p) for p in prompts], "OpenAI")


def test_html_unescape_is_the_only_difference_from_openai(corpus, ours, openai):
    """Unescaping the prompt beforehand, as OpenAI's basic_clean does, gives back OpenAI's ids."""
    prompts = [p for p in corpus if differs_by_design(p) and "oftext|>" not in p.lower()]
    assert len(prompts) >= 2
    unescaped = [html.unescape(html.unescape(ftfy.fix_text(p))) for p in prompts]
    assert_same(prompts, [ours.encode(p) for p in unescaped], [openai.encode(p) for p in prompts], "OpenAI")


def test_every_character_splits_as_openai(ours, openai):
    """Each assigned code point below U+3000 between letters, after an apostrophe, before a digit:
    the Rust regex must classify it as the original Python one (letters, digits, contractions)."""
    chars = [chr(c) for c in range(0x3000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    text = " ".join(f"a{c}b'{c}1" for c in chars if c != "&")  # no "&": no accidental entities
    assert ours.encode(text) == openai.encode(text)


def test_sd2_tokenizer_matches_open_clip(corpus, openai):
    """SD 2.x tokenizes with open_clip (html-unescaped, padded with 0): the same (B, 77) ids as
    its tokenizer on every prompt, truncated ones included, except prompts that spell a special
    token (open_clip renamed them)."""
    ours = CLIPTokenizer.open_clip()
    prompts = [p for p in corpus if not re.search(r"<\|(start|end)oftext\|>", p, re.I)]
    assert len(prompts) >= len(corpus) - 5
    theirs = openai(prompts, context_length=77)
    assert_same(prompts, ids_quietly(ours, prompts), theirs.tolist(), "open_clip")
    assert ours.decode(ours(["a cat!"])[0]) == "a cat !"  # id 0 is "!": padding is not decoded


def test_decode_matches_openai(corpus, ours, openai):
    """decode() gives OpenAI's decode of the same ids (less its trailing space), on every prompt,
    truncated ones included (a cut emoji's bytes become U+FFFD in both). Prompts that spell a
    special token are left out: decode() drops it, open_clip writes its renamed form."""
    prompts = [p for p in corpus if not re.search(r"<\|(start|end)oftext\|>", p, re.I)]
    assert len(prompts) >= len(corpus) - 5
    for prompt in prompts:
        for ids in (ours.encode(prompt), ours.encode(prompt)[:75]):  # as the 77-id row cuts it
            assert ours.decode(ids) == openai.decode(ids).strip(), prompt


def test_decode_skips_special_tokens_and_padding(ours):
    ids = ours(["A Photo of a CAT,  sitting"])[0]  # (77,): start, 8 ids, end, padding
    assert ours.decode(ids) == "a photo of a cat , sitting"
    with pytest.raises(ValueError, match="token ids"):
        ours.decode([320, 49408])


# --- known ids, truncation, shapes ---------------------------------------------------------------

@pytest.mark.parametrize("prompt, ids", [
    ("a photo of a cat", [320, 1125, 539, 320, 2368]),
    ("Café &amp; cafÃ©", [15304, 261, 15304]),  # ftfy: mojibake and HTML entity repaired
    ("IT'S A DOG'S LIFE", [585, 568, 320, 1929, 568, 970]),  # lower-cased, "'s" split off
    ("it’s ﬁne", [585, 568, 3797]),  # ftfy: curly quote and ligature undone
    ("🐱 1.5", [22979, 272, 269, 276]),  # digits one at a time
    (" \t\n ", []),
])
def test_known_ids(ours, prompt, ids):
    row = ids + [END]
    assert ours(prompt).tolist() == [[START] + row + [END] * (77 - 1 - len(row))]
    assert ours.encode(prompt) == ids


def test_long_prompt_is_truncated_with_a_warning(ours):
    prompt = "a photo of a cat " * 20  # 100 words, each a single token
    words = [320, 1125, 539, 320, 2368] * 20
    dropped = len([START] + words + [END]) - 77
    with pytest.warns(UserWarning, match=f"dropping the last {dropped} tokens of 'a photo of a cat a photo"):
        ids = ours(prompt)
    assert dropped == 25
    assert ids.tolist() == [[START] + words[:75] + [END]]


def test_no_warning_up_to_77_tokens(ours):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = ours(" ".join(["cat"] * 75))
    assert ids[0, -1] == END and ids[0, -2] == 2368
    with pytest.warns(UserWarning, match="dropping the last 1 tokens"):
        ours(" ".join(["cat"] * 76))


def test_batch_shape_dtype_and_padding():
    ids = CLIPTokenizer()(["a cat", "", "a photo of a dog"])
    assert ids.shape == (3, 77) and ids.dtype == torch.long
    assert (ids[:, 0] == START).all()
    assert ids[1].tolist() == [START] + [END] * 76
    assert CLIPTokenizer()("a cat").shape == (1, 77)
    with pytest.warns(UserWarning, match="dropping the last 4 tokens"):
        short = CLIPTokenizer(max_length=8)(["a photo of a cat", "cat " * 10])
    assert short.tolist() == [[START, 320, 1125, 539, 320, 2368, END, END], [START] + [2368] * 6 + [END]]
