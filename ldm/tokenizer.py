"""CLIP's byte-level BPE tokenizer, with the conventions of Stable Diffusion 1.x.

A prompt becomes 77 ids: <|startoftext|> (49406), the BPE ids, <|endoftext|> (49407), then
49407 again as padding; longer prompts are cut so that 49407 is still the last id. This is what
the CompVis original gets from transformers' slow `CLIPTokenizer` called with
`truncation=True, max_length=77, padding="max_length"`.

The pipeline, in the order of OpenAI's `SimpleTokenizer`:
  1. clean-up, in Python, exactly as the reference: `ftfy.fix_text` (mojibake, HTML entities,
     curly quotes, NFC), every whitespace run to one space, strip, lower-case;
  2. split with CLIP's regex: contractions, letter runs, single digits, punctuation runs;
  3. map each UTF-8 byte to a printable character (GPT-2's byte-level trick), so that every
     string is spelled with the 256 base symbols and nothing is ever unknown;
  4. BPE with OpenAI's merges, the last symbol of each word carrying "</w>".
Steps 2-4 run in the Rust `tokenizers` library.

The vocabulary is OpenAI's `bpe_simple_vocab_16e6.txt.gz`, shipped in `ldm/assets` (MIT).
Caveat: the split's letter/digit classes come from the regex engine's Unicode tables (Rust's
Oniguruma here, Python's `regex` in the reference), so characters assigned in a Unicode version
only one of them knows (about 17k new in Unicode 17) may split differently.
Axis letters: B prompts, T tokens (= max_length).
"""
import functools
import gzip
import html
import re
import warnings
from pathlib import Path

import ftfy
import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

VOCAB_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
START, END = "<|startoftext|>", "<|endoftext|>"
START_ID, END_ID = 49406, 49407
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges: 512 + 48894 + 2 = 49408 ids

# CLIP's split: the special tokens, English contractions, letter runs, one digit at a time, runs
# of anything else but spaces. Case-insensitive as in the original, which matters even after
# lower-casing: "'ſ" (long s) is the contraction "'s".
CLIP_SPLIT = r"""(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class CLIPTokenizer:
    """Prompts -> (B, T) token ids for CLIP's text encoder, T = `max_length` (77 in SD).

    The defaults are SD 1.x's (transformers' CLIPTokenizer). SD 2.x tokenizes with open_clip's
    `tokenize`, which differs in two ways: padding with id 0 (`pad_id=0`), and html-unescaping
    the prompt twice before the clean-up (`html_unescape=True`); `CLIPTokenizer.open_clip()`.
    """

    def __init__(self, max_length=77, vocab_path=VOCAB_PATH, *, pad_id=END_ID,
                 html_unescape=False):
        self.max_length = max_length
        self.pad_id = pad_id
        self.html_unescape = html_unescape
        self._bpe = _build_bpe(str(vocab_path))

    @classmethod
    def open_clip(cls, max_length=77):
        """SD 2.x's tokenizer: open_clip's conventions (see the class docstring)."""
        return cls(max_length, pad_id=0, html_unescape=True)

    def __call__(self, prompts: str | list[str]) -> torch.LongTensor:
        """str or list of B str -> LongTensor (B, T): start, ids, end, padding."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            row = self._truncate([START_ID] + self.encode(prompt) + [END_ID], prompt)
            ids[b, : len(row)] = torch.tensor(row)
        return ids

    def encode(self, text: str) -> list[int]:
        """str -> the BPE ids of `text`, without start/end tokens and without truncation."""
        return self._bpe.encode(clean(text, self.html_unescape), add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Token ids (a list, or a (T,) tensor) -> text, special tokens and padding left out.

        Words come back cleaned and lower-cased, as the model saw them; each BPE word end
        ("</w>") becomes a space, so punctuation stands apart ("a cat , sitting"), as in
        OpenAI's SimpleTokenizer.decode (whose trailing space is stripped here). Bytes that do
        not form valid UTF-8 (a character cut by truncation) become U+FFFD.
        """
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        tokens = [self._bpe.id_to_token(i) for i in _without_padding(ids, self.pad_id)
                  if i not in (START_ID, END_ID)]
        if None in tokens:
            raise ValueError(f"token ids must be in [0, {END_ID}], got {ids}")
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        text = "".join(tokens).replace("</w>", " ")
        return bytes(byte_of.get(c, ord(c)) for c in text).decode("utf-8", "replace").strip()

    def _truncate(self, row, prompt):
        """Cut `row` to max_length ids, keeping the end token last, as transformers does."""
        dropped = len(row) - self.max_length
        if dropped <= 0:
            return row
        warnings.warn(
            f"prompt is {len(row)} tokens, longer than {self.max_length}: dropping the last "
            f"{dropped} tokens of {prompt[:50]!r}{'...' if len(prompt) > 50 else ''}",
            stacklevel=3,
        )
        return row[: self.max_length - 1] + [END_ID]


def clean(text, html_unescape=False):
    """The text clean-up of transformers' slow CLIPTokenizer (with ftfy installed):
    `whitespace_clean(ftfy.fix_text(text)).lower()`.

    OpenAI's own `basic_clean` (hence open_clip's, hence SD 2's) also runs `html.unescape`
    twice; transformers does not, and SD 1 was trained and is run with transformers, so only
    `html_unescape=True` does. ftfy already decodes entities such as "&amp;", unless the text
    contains a "<" (it may be HTML, left as it is).
    """
    text = ftfy.fix_text(text)
    if html_unescape:
        text = html.unescape(html.unescape(text))
    # The reference's `\s` is the `regex` module's; the stdlib's also matches \x1c-\x1f, which
    # ftfy has already removed, so the two agree here.
    text = re.sub(r"\s+", " ", text).strip()
    return text.lower()


def _without_padding(ids, pad_id):
    """ids up to the first padding id after the end token (SD 2 pads with 0, a real token: "!")."""
    if pad_id != END_ID and END_ID in ids:
        return ids[: ids.index(END_ID) + 1]
    return ids


@functools.lru_cache(maxsize=None)
def _build_bpe(vocab_path):
    """Build (once per path) the `tokenizers` pipeline of steps 2-4 from OpenAI's merges file."""
    lines = gzip.open(vocab_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a header
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
    bpe = models.BPE(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=merges,
        continuing_subword_prefix="",
        end_of_word_suffix="</w>",
    )
    tokenizer = Tokenizer(bpe)
    # A quirk of the original's case-insensitive regex, reproduced: U+0345 (combining Greek
    # ypogegrammeni, a mark whose case-fold is the letter ι) matches neither [\p{L}] nor
    # [^\s\p{L}\p{N}] there, so `findall` skips it, like a space: it ends the run it is in.
    tokenizer.normalizer = normalizers.Replace("\u0345", " ")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),  # drop spaces
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> symbols
    ])
    # Matched whole before the split, so they never go through BPE (OpenAI seeds its BPE cache
    # with them for the same reason).
    tokenizer.add_special_tokens([START, END])
    return tokenizer


def _bytes_to_unicode():
    """GPT-2/CLIP's byte -> printable character map, in CLIP's order (the first 256 vocab ids):
    printable Latin-1 bytes map to themselves, the other 68 to chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(c) for b, c in zip(printable + others, printable + [256 + n for n in range(len(others))])}
