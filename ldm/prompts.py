r"""Prompt syntax, weights and long prompts, with AUTOMATIC1111's rules.

    pieces = parse("a (red:1.3) cat")          # [("a ", 1.0), ("red", 1.3), (" cat", 1.0)]
    tokens = tokenize(tokenizer, prompts)      # Tokens: ids and weights (B, n, 77)
    context = encode(tokens, lambda ids: text_encoder(ids))   # (B, 77·n, D)

1. Syntax (`parse`, A1111 modules/prompt_parser.py parse_prompt_attention). `(x)` multiplies the
   weight of x by 1.1, `[x]` by 1/1.1, `(x:w)` by w (a signed decimal, spaces allowed around
   it); nested brackets multiply. A bracket never closed applies to the end of the prompt, a
   closing bracket never opened is text. `\(` `\)` `\[` `\]` `\\` are the characters
   themselves, any other backslash is dropped. `(x:w)` with a w that is not a number, `(a:b)`,
   is text emphasised by 1.1. `BREAK` (the word, upper-case) ends the chunk, except inside
   brackets: A1111 multiplies its marker like any piece, so there it is the word "break" with
   a weight of -1.1 (reproduced). syntax="plain" takes the prompt literally, brackets and
   BREAK included, as CompVis does (A1111's emphasis "None").
2. Chunks (`tokenize`, A1111 modules/sd_hijack_clip.py tokenize_line). Each text piece is
   tokenized on its own; the ids fill chunks of 75 (max_length - 2), each written as start,
   ids, end, padding to 77, the padding the family's: the end id for SD 1 and CLIP-L, 0 for
   SD 2 and OpenCLIP-bigG. When a chunk is full and its last comma is within `comma_backtrack`
   (20) ids of its end, the ids after that comma move on to the next chunk. A prompt of n
   chunks is n rows of 77 ids; prompts of fewer chunks are padded with empty chunks (start,
   end, padding: the empty prompt).
3. Textual-inversion embeddings (the `embeddings` mapping, {trigger word: vector count or
   (count, D) tensor}): where the trigger's ids appear in a piece they are replaced by `count`
   placeholder ids (0) carrying the piece's weight, never split across chunks (a vector run
   that would not fit starts the next chunk); `encode` writes the vectors over the token
   embeddings at those positions (A1111 sd_hijack.py EmbeddingsWithFixes). Unlike A1111, a
   comma backtrack moves the placeholders' vectors with them (A1111 leaves them behind, in the
   first chunk's padding).
4. Encoding (`encode`): every chunk goes through the text encoder on its own; the hidden
   states are weighted per chunk and concatenated along the tokens, (B, 77·n, D). Emphasis:
     "original" (A1111 sd_emphasis.py EmphasisOriginal): z' = z·w, then z'·(mean(z)/mean(z')),
                the means over the chunk's (77, D) values of one prompt;
     "no_norm"  (A1111 "No norm"): z·w;
     "comfy"    (ComfyUI comfy/sd1_clip.py encode_token_weights, compel's
                build_weighted_embedding_tensor): e + (z − e)·w for the tokens of weight ≠ 1,
                e the encoding of the empty prompt at the same position.
   A prompt whose weights are all 1 is left exactly as encoded, so a plain prompt of ≤ 75
   tokens gives the ids and the conditioning of `CLIPTokenizer.__call__` bit for bit.

Where the peers differ: A1111 takes the mean of "original" over the whole batch of a chunk,
here over each prompt (the same for one prompt, and a prompt's conditioning no longer depends
on its neighbours). ComfyUI's `(x:w)` sets the weight instead of multiplying it, and it has
no `[x]`, BREAK or comma rule (it keeps words whole); compel also blends weights < 1 with
the prompt masked.

Axis letters: B prompts, n chunks, T tokens per chunk (77), D width.
"""
import math
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ldm.tokenizer import END_ID, START_ID

SYNTAXES = ("a1111", "plain")
EMPHASES = ("original", "no_norm", "comfy")
BREAK = ("BREAK", -1.0)  # the piece `parse` puts where a chunk must end (A1111's marker)
PLACEHOLDER_ID = 0  # the id under an embedding's vectors, as in A1111 (overwritten anyway)
EMPHASIS_UP = 1.1  # (x)
EMPHASIS_DOWN = 1 / 1.1  # [x]

# A1111's emphasis tokens, one alternative per line, tried in this order.
_TOKEN = re.compile(r"""
      \\[()\[\]\\]              # \( \) \[ \] \\ : the character itself
    | \\                        # any other backslash: dropped
    | [(\[]                     # opens a range
    | :\s*([+-]?[.\d]+)\s*\)    # ":1.3)" closes a round range with its own weight
    | [)\]]                     # closes a range
    | [^\\()\[\]:]+             # text
    | :                         # a colon that is not a weight: text
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


# ---------------------------------------------------------------- 1. syntax
def parse(prompt, syntax="a1111"):
    """A prompt -> [(text, weight), ...] (see the module docstring), runs of equal weight
    merged, [("", 1.0)] when nothing is left; BREAK marks a chunk break."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    if syntax == "plain":
        return [(prompt, 1.0)]
    if syntax != "a1111":
        raise ValueError(f"syntax must be one of {SYNTAXES}, got {syntax!r}")
    pieces = []  # [text, weight]; a range's weights are multiplied when it closes
    opened = {"(": [], "[": []}  # where each open range starts in pieces

    def scale(start, factor):
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKEN.finditer(prompt):
        token, weight = match.group(0), match.group(1)
        if token[0] == "\\":
            pieces.append([token[1:], 1.0])
        elif token in ("(", "["):
            opened[token].append(len(pieces))
        elif weight is not None and opened["("]:
            scale(opened["("].pop(), _number(weight, prompt))
        elif token == ")" and opened["("]:
            scale(opened["("].pop(), EMPHASIS_UP)
        elif token == "]" and opened["["]:
            scale(opened["["].pop(), EMPHASIS_DOWN)
        else:  # text, or a bracket that closes nothing
            pieces += _split_breaks(token)
    for start in opened["("]:  # ranges never closed run to the end: "(unbalanced" is 1.1
        scale(start, EMPHASIS_UP)
    for start in opened["["]:
        scale(start, EMPHASIS_DOWN)
    return _checked(_merge(pieces) or [("", 1.0)], prompt)


def _number(weight, prompt):
    try:
        return float(weight)
    except ValueError:  # the pattern also takes "1.2.3" or "."; A1111 fails here too
        raise ValueError(f"prompt weight {weight!r} is not a number, in {prompt!r}") from None


def _split_breaks(text):
    """Text -> [text, 1.0] pieces with a BREAK piece at each BREAK."""
    first, *rest = _BREAK.split(text)
    pieces = [[first, 1.0]]
    for part in rest:
        pieces += [list(BREAK), [part, 1.0]]
    return pieces


def _merge(pieces):
    merged = []
    for text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged


def _checked(pieces, prompt):
    for text, weight in pieces:
        if not math.isfinite(weight):
            raise ValueError(f"the weight of {text!r} is {weight}, in {prompt!r}")
    return pieces


# ---------------------------------------------------------------- 2. chunks
@dataclass(frozen=True)
class Placement:
    """An embedding's vectors go to rows `start` .. `start + length - 1` of chunk `chunk` of
    prompt `prompt`, where the ids are PLACEHOLDER_ID."""
    prompt: int
    chunk: int
    start: int
    length: int
    trigger: str


@dataclass(frozen=True, eq=False)  # eq would compare tensors
class Tokens:
    """B prompts as n chunks of T = max_length ids.

    ids: (B, n, T) int64, each row start, up to T - 2 ids, end, padding (`pad_id`); weights:
    (B, n, T) float32, each id's emphasis (1 for start, end and padding); placements: where
    embeddings' vectors go (`encode` writes them).
    """
    ids: torch.Tensor
    weights: torch.Tensor
    pad_id: int
    placements: tuple = ()

    @property
    def chunks(self):
        return self.ids.shape[1]

    def empty_ids(self):
        """(1, T): the empty prompt's ids, start, end, padding."""
        T = self.ids.shape[2]
        return torch.tensor([_row(_Chunk(), T - 2, self.pad_id)[0]])

    def padded(self, chunks):
        """The same prompts with empty chunks appended up to `chunks`: (B, chunks, T)."""
        missing = chunks - self.chunks
        if missing < 0:
            raise ValueError(f"cannot pad {self.chunks} chunks to {chunks}")
        B, _, T = self.ids.shape
        ids = self.empty_ids().expand(B, missing, T)
        return replace(self, ids=torch.cat([self.ids, ids], dim=1),
                       weights=torch.cat([self.weights, torch.ones(B, missing, T)], dim=1))


def tokenize(tokenizer, prompts, *, syntax="a1111", embeddings=None, comma_backtrack=20):
    """A prompt or a list of B prompts -> Tokens, chunked as A1111 chunks (module docstring).

    tokenizer: a CLIPTokenizer (its max_length, pad_id and `encode` are used);
    embeddings: {trigger word: vector count, or a (count, D) tensor};
    comma_backtrack: A1111's "prompt word wrap length limit", 0 to cut at every 75 ids.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts is an empty list: give at least one prompt")
    if not isinstance(comma_backtrack, int) or comma_backtrack < 0:
        raise ValueError(f"comma_backtrack must be an integer >= 0, got {comma_backtrack!r}")
    size = tokenizer.max_length - 2
    triggers = _Triggers(tokenizer, embeddings or {}, size)
    chunker = _Chunker(tokenizer, triggers, comma_backtrack)
    chunked = [chunker(parse(prompt, syntax)) for prompt in prompts]
    n = max(len(chunks) for chunks in chunked)
    rows = [[_row(c, size, tokenizer.pad_id) for c in chunks + [_Chunk()] * (n - len(chunks))]
            for chunks in chunked]
    placements = tuple(Placement(b, k, 1 + offset, length, trigger)
                       for b, chunks in enumerate(chunked) for k, c in enumerate(chunks)
                       for offset, length, trigger in c.placements)
    return Tokens(ids=torch.tensor([[ids for ids, _ in row] for row in rows]),
                  weights=torch.tensor([[w for _, w in row] for row in rows], dtype=torch.float32),
                  pad_id=tokenizer.pad_id, placements=placements)


def pad_chunks(*tokens):
    """Tokens of different chunk counts (a prompt and its negative, SDXL's two encoders) ->
    the same, each padded with empty chunks to the largest count."""
    n = max(t.chunks for t in tokens)
    return tuple(t.padded(n) for t in tokens)


@dataclass
class _Chunk:
    ids: list = field(default_factory=list)  # at most T - 2, without start and end
    weights: list = field(default_factory=list)
    placements: list = field(default_factory=list)  # (offset in ids, length, trigger)

    def add(self, ids, weight):
        self.ids += ids
        self.weights += [weight] * len(ids)

    def split(self, at):
        """Keep ids[:at], return the rest as a new chunk, with the embeddings found there."""
        rest = _Chunk(self.ids[at:], self.weights[at:],
                      [(o - at, n, t) for o, n, t in self.placements if o >= at])
        self.ids, self.weights = self.ids[:at], self.weights[:at]
        self.placements = [p for p in self.placements if p[0] < at]
        return rest


def _row(chunk, size, pad_id):
    """A chunk -> (T ids, T weights): start, ids, end, padding."""
    pad = size - len(chunk.ids)
    ids = [START_ID, *chunk.ids, END_ID] + [pad_id] * pad
    return ids, [1.0, *chunk.weights, 1.0] + [1.0] * pad


class _Chunker:
    """Pieces of one prompt -> its chunks (A1111's tokenize_line)."""

    def __init__(self, tokenizer, triggers, comma_backtrack):
        self.tokenizer, self.triggers, self.backtrack = tokenizer, triggers, comma_backtrack
        self.size = tokenizer.max_length - 2
        (self.comma,) = tokenizer.encode(",")

    def __call__(self, pieces):
        self.chunks, self.current, self.last_comma = [], _Chunk(), -1
        for text, weight in pieces:
            if (text, weight) == BREAK:
                self.close()
            else:
                self.add(self.tokenizer.encode(text), weight)
        if self.current.ids or not self.chunks:
            self.close()
        return self.chunks

    def close(self, following=None):
        """End the current chunk; the next one starts as `following` (or empty)."""
        self.chunks.append(self.current)
        self.current, self.last_comma = _Chunk() if following is None else following, -1

    def add(self, ids, weight):
        i = 0
        while i < len(ids):
            if ids[i] == self.comma:
                self.last_comma = len(self.current.ids)
            elif self._backtracks():  # the words after the last comma move on
                self.close(self.current.split(self.last_comma + 1))
            if len(self.current.ids) == self.size:
                self.close()
            match = self.triggers.match(ids, i)
            if match is None:
                self.current.add([ids[i]], weight)
                i += 1
                continue
            matched, length, trigger = match
            if len(self.current.ids) + length > self.size:  # an embedding is never split
                self.close()
            self.current.placements.append((len(self.current.ids), length, trigger))
            self.current.add([PLACEHOLDER_ID] * length, weight)
            i += matched

    def _backtracks(self):
        """Is the chunk full with its last comma within `backtrack` ids of the end?"""
        return (self.backtrack > 0 and len(self.current.ids) == self.size
                and self.last_comma != -1 and self.size - self.last_comma <= self.backtrack)


class _Triggers:
    """Embedding trigger words found by their token ids, the longest first (A1111's
    EmbeddingDatabase.find_embedding_at_position): a word matches where its BPE ids appear."""

    def __init__(self, tokenizer, embeddings, size):
        self.by_first_id, seen = {}, {}
        for trigger, vectors in embeddings.items():
            ids = tuple(tokenizer.encode(trigger)) if isinstance(trigger, str) else ()
            if not ids:
                raise ValueError(f"embedding trigger {trigger!r} must be a non-empty word")
            if ids in seen:
                raise ValueError(f"embedding triggers {seen[ids]!r} and {trigger!r} are the same "
                                 "tokens: give each embedding its own word")
            seen[ids] = trigger
            entry = (list(ids), _vector_count(trigger, vectors, size), trigger)
            self.by_first_id.setdefault(ids[0], []).append(entry)
        for entries in self.by_first_id.values():
            entries.sort(key=lambda e: -len(e[0]))

    def match(self, ids, i):
        """(ids matched, vector count, trigger) of the trigger at ids[i], or None."""
        for trigger_ids, length, trigger in self.by_first_id.get(ids[i], ()):
            if ids[i : i + len(trigger_ids)] == trigger_ids:
                return len(trigger_ids), length, trigger
        return None


def _vector_count(trigger, vectors, size):
    if isinstance(vectors, torch.Tensor):
        if vectors.ndim != 2:
            raise ValueError(f"embedding {trigger!r} must be a (count, D) tensor, got shape "
                             f"{tuple(vectors.shape)}")
        vectors = vectors.shape[0]
    if isinstance(vectors, bool) or not isinstance(vectors, int) or not 1 <= vectors <= size:
        raise ValueError(f"embedding {trigger!r} must have 1 to {size} vectors (one chunk), "
                         f"got {vectors!r}")
    return vectors


# ---------------------------------------------------------------- 3. encoding
def encode(tokens, encode_chunk, *, emphasis="original", embeddings=None, token_embedding=None):
    """Tokens (B, n, T) -> context (B, n·T, D): each chunk encoded alone, weighted, concatenated.

    encode_chunk: ids (B, T) -> hidden states (B, T, D), or (hidden, pooled (B, P)) as SDXL's
        OpenCLIP-bigG: then (context, the pooled vectors of the first chunk) is returned.
    emphasis: "original", "no_norm" or "comfy" (module docstring).
    embeddings: {trigger: (count, D) tensor}, the vectors of tokens.placements, written over
        the output of `token_embedding` (the encoder's nn.Embedding, `find_token_embedding`)
        while the chunk that holds them is encoded.
    """
    if emphasis not in EMPHASES:
        raise ValueError(f"emphasis must be one of {EMPHASES}, got {emphasis!r}")
    _check_embeddings(tokens.placements, embeddings, token_embedding)
    outputs = []  # (hidden (B, T, D), pooled or None) of each chunk
    for k in range(tokens.chunks):
        placed = [p for p in tokens.placements if p.chunk == k]
        with _written_over(token_embedding, placed, embeddings):
            outputs.append(_split_output(encode_chunk(tokens.ids[:, k]), tokens.ids[:, k]))
    empty = None
    if emphasis == "comfy" and (tokens.weights != 1).any():
        empty_ids = tokens.empty_ids()
        empty = _split_output(encode_chunk(empty_ids), empty_ids)[0]
    context = torch.cat([weigh(z, tokens.weights[:, k], emphasis, empty)
                         for k, (z, _) in enumerate(outputs)], dim=1)
    pooled = outputs[0][1]  # SDXL's pooled text: the first chunk's, as A1111 takes it
    return context if pooled is None else (context, pooled)


def weigh(z, weights, emphasis="original", empty=None):
    """One chunk's hidden states z (B, T, D) and weights (B, T) -> weighted (B, T, D).

    Computed in float32 (the means of "original" in float64) and returned in z's dtype;
    prompts whose weights are all 1 are returned as they are. "comfy" needs `empty`, the encoding of the empty prompt (1, T, D).
    """
    w = weights.to(z.device, torch.float32)[..., None]  # (B, T, 1)
    weighted = (w != 1).flatten(1).any(dim=1)  # (B,)
    if not weighted.any():
        return z
    z32 = z.float()
    if emphasis == "original":
        out = z32 * w
        # A1111: "restoring original mean is likely not correct, but it seems to work well to
        # prevent artifacts that happen otherwise" (sd_emphasis.py). The means in float64: they
        # are often near 0, where a float32 sum of 77·D values keeps only a few digits.
        ratio = _mean(z32) / _mean(out)  # (B, 1, 1)
        out = out * ratio.float()
    elif emphasis == "no_norm":
        out = z32 * w
    elif emphasis == "comfy":
        if empty is None:
            raise ValueError('emphasis "comfy" needs the encoding of the empty prompt (empty=)')
        e = empty.float()
        out = torch.where(w != 1, (z32 - e) * w + e, z32)
    else:
        raise ValueError(f"emphasis must be one of {EMPHASES}, got {emphasis!r}")
    if not torch.isfinite(out[weighted]).all():
        raise ValueError(f'emphasis "{emphasis}" gave non-finite values: with "original", the '
                         "weights must not bring a chunk's mean to 0")
    return torch.where(weighted[:, None, None], out, z32).to(z.dtype)


def _mean(z):
    """(B, T, D) -> the mean of each prompt's chunk, (B, 1, 1) in float64."""
    return z.double().mean(dim=(1, 2), keepdim=True)


def find_token_embedding(text_encoder):
    """The nn.Embedding of token ids in a text encoder (the module named `token_embedding`)."""
    for name, module in text_encoder.named_modules():
        if name.rsplit(".", 1)[-1] == "token_embedding" and isinstance(module, nn.Embedding):
            return module
    raise ValueError(f"{type(text_encoder).__name__} has no nn.Embedding named token_embedding")


def _split_output(out, ids):
    """encode_chunk's output -> (hidden (B, T, D), pooled or None), shapes checked."""
    z, pooled = out if isinstance(out, tuple) else (out, None)
    if not isinstance(z, torch.Tensor) or z.ndim != 3 or z.shape[:2] != ids.shape:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"encode_chunk must return hidden states (B, T, D) = ({ids.shape[0]}, "
                         f"{ids.shape[1]}, D) for ids {tuple(ids.shape)}, got {shape}")
    return z, pooled


def _check_embeddings(placements, embeddings, token_embedding):
    if not placements:
        return
    if embeddings is None or token_embedding is None:
        raise ValueError("the prompts hold embeddings: give encode() their vectors "
                         "(embeddings=) and the text encoder's token_embedding=")
    width = token_embedding.embedding_dim
    for trigger, length in {(p.trigger, p.length) for p in placements}:
        vectors = embeddings.get(trigger)
        if not isinstance(vectors, torch.Tensor) or tuple(vectors.shape) != (length, width):
            got = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else vectors
            raise ValueError(f"embedding {trigger!r} must be a ({length}, {width}) tensor for "
                             f"this text encoder, got {got}")


@contextmanager
def _written_over(token_embedding, placements, embeddings):
    """While active, the embeddings' vectors replace the token embeddings at their placements,
    in this thread only: another thread may be running the same text encoder."""
    if not placements:
        yield
        return
    owner = threading.get_ident()

    def hook(module, args, out):  # out: (B, T, D)
        if threading.get_ident() != owner:
            return None  # leaves the output as it is
        out = out.clone()
        for p in placements:
            out[p.prompt, p.start : p.start + p.length] = embeddings[p.trigger].to(out)
        return out

    handle = token_embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
