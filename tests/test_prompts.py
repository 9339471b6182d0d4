"""Prompt syntax, chunks and weights (ldm/prompts.py): A1111's parser on its own documented
examples and on hand-derived cases, the chunking rules at their exact boundaries, embeddings'
placements, and the weighting formulas recomputed directly on tiny random text encoders.

Token ids used below: "cat" is 2368 and "," is 267, each one token, so n words are n ids.
"""
import threading
from pathlib import Path

import pytest
import torch

from ldm.models.clip_text import CLIP_TINY, CLIPTextModel
from ldm.models.open_clip_text import OPEN_CLIP_TINY, OpenCLIPTextModel
from ldm.prompts import (BREAK, PLACEHOLDER_ID, encode, find_token_embedding, pad_chunks, parse,
                         tokenize, weigh)
from ldm.tokenizer import CLIPTokenizer

from helpers import fresh_seed, randomize_, rel_error

START, END, CAT, COMMA = 49406, 49407, 2368, 267
PROMPTS = Path(__file__).parent / "data" / "prompts.txt"


@pytest.fixture(scope="module")
def sd1():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def sd2():
    return CLIPTokenizer.open_clip()


def cats(n):
    return " ".join(["cat"] * n)


def row(ids, pad=END):
    """A 77-id chunk: start, ids, end, padding."""
    return [START, *ids, END] + [pad] * (75 - len(ids))


# ---------------------------------------------------------------- syntax
# The doctest of A1111's parse_prompt_attention (AUTOMATIC1111/stable-diffusion-webui,
# modules/prompt_parser.py), its expected values as published there.
A1111_DOCTEST = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
      ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("prompt, expected", A1111_DOCTEST)
def test_parse_matches_a1111_doctest(prompt, expected):
    assert parse(prompt) == expected  # exact floats: the multiplications happen in A1111's order


# Derived by hand from A1111's rules (module docstring of ldm/prompts.py).
HAND_DERIVED = [
    ("[a]", [("a", 1 / 1.1)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("[a", [("a", 1 / 1.1)]),  # never closed: to the end
    ("((a)", [("a", 1.1 * 1.1)]),  # the inner range closes, the outer runs to the end
    ("(a (b:2))", [("a ", 1.1), ("b", 2 * 1.1)]),  # nested weights multiply
    ("(a:0.5) [b:0.5]", [("a", 0.5), (" ", 1.0), ("b:0.5", 1 / 1.1)]),  # [x:w] has no weight
    ("[(a)]", [("a", 1.0)]),  # 1.1 · (1/1.1) is exactly 1.0
    ("(a: 1.5 )", [("a", 1.5)]),  # spaces around the weight
    ("(a:-1) (b:+.5)", [("a", -1.0), (" ", 1.0), ("b", 0.5)]),
    ("(a:b)", [("a:b", 1.1)]),  # not a number: text, and the bracket still emphasises
    ("(a:1e3)", [("a:1e3", 1.1)]),
    ("a:1.2) b]", [("a:1.2) b]", 1.0)]),  # closing brackets that close nothing are text
    ("a: b", [("a: b", 1.0)]),
    ("\\\\(a)", [("\\", 1.0), ("a", 1.1)]),  # \\ is a backslash; the bracket still counts
    ("a\\b \\: c", [("ab : c", 1.0)]),  # any other backslash is dropped
    ("\\((a\\))", [("(", 1.0), ("a)", 1.1)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),  # the spaces around BREAK go with it
    ("a BREAK BREAK b", [("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0)]),
    ("BREAK", [("", 1.0), BREAK, ("", 1.0)]),
    ("a,BREAK,b", [("a,", 1.0), BREAK, (",b", 1.0)]),
    ("aBREAK b break c", [("aBREAK b break c", 1.0)]),  # a whole upper-case word only
    # Inside brackets the BREAK marker is multiplied like any piece: no longer a break, but
    # the word with weight -1.1, as in A1111.
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
]


@pytest.mark.parametrize("prompt, expected", HAND_DERIVED)
def test_parse_edge_cases(prompt, expected):
    assert parse(prompt) == expected


def test_plain_syntax_is_literal():
    prompt = "a (red:1.3) \\[cat] BREAK dog"
    assert parse(prompt, syntax="plain") == [(prompt, 1.0)]


@pytest.mark.parametrize("prompt, message", [
    ("(a:1.2.3)", "prompt weight '1.2.3' is not a number"),  # matches the pattern; A1111 fails too
    ("(a:.)", "prompt weight '.' is not a number"),
    ("(a:" + "9" * 400 + ")", "the weight of 'a' is inf"),
    ("(((a:1e300)))" + "(" * 8000 + "b", "the weight of 'b' is inf"),
])
def test_parse_refuses_weights_that_are_no_finite_number(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse(prompt)


def test_parse_checks_its_arguments():
    with pytest.raises(TypeError, match="prompt must be a string, got int"):
        parse(3)
    with pytest.raises(ValueError, match="syntax must be one of"):
        parse("a", syntax="comfy")


# ---------------------------------------------------------------- chunks
def ids(tokens, b=0):
    return tokens.ids[b].tolist()


def test_chunk_boundaries_75_and_76(sd1):
    assert ids(tokenize(sd1, cats(75))) == [row([CAT] * 75)]
    assert ids(tokenize(sd1, cats(76))) == [row([CAT] * 75), row([CAT])]
    assert ids(tokenize(sd1, cats(150))) == [row([CAT] * 75)] * 2
    assert ids(tokenize(sd1, "")) == [row([])]


def test_a_long_prompt_keeps_every_token(sd1):
    prompt = "a photo of an astronaut riding a horse on the moon " * 30  # 330 ids, no comma
    stream = sd1.encode(prompt)
    t = tokenize(sd1, prompt)
    assert len(stream) == 330 and t.chunks == 5
    body = t.ids[0, :, 1:-1].flatten().tolist()
    assert body[:330] == stream and body[330:] == [END] * 45
    assert (t.ids[0, :, 0] == START).all() and (t.ids[0, :, -1] == END).all()


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_plain_prompts_up_to_75_tokens_give_the_tokenizers_ids(family, request):
    """Either syntax: the prompts without brackets, backslashes or BREAK."""
    tokenizer = request.getfixturevalue(family)
    lines = PROMPTS.read_text(encoding="utf-8").removesuffix("\n").split("\n")
    prompts = [p for p in lines + [cats(75), ""] if len(tokenizer.encode(p)) <= 75]
    assert len(prompts) >= 100
    expected = tokenizer(prompts)
    assert torch.equal(tokenize(tokenizer, prompts, syntax="plain").ids[:, 0], expected)
    literal = [p for p in prompts if not any(c in p for c in "()[]\\") and "BREAK" not in p]
    assert len(literal) >= 90
    assert torch.equal(tokenize(tokenizer, literal).ids[:, 0], tokenizer(literal))


def test_comma_backtrack_moves_the_words_after_the_last_comma(sd1):
    # 60 cats, a comma, 20 cats: the chunk fills 14 ids after the comma (75 - 60 = 15 <= 20),
    # so those 14 and the 6 left start the next chunk.
    t = tokenize(sd1, cats(60) + ", " + cats(20))
    assert ids(t) == [row([CAT] * 60 + [COMMA]), row([CAT] * 20)]
    assert ids(tokenize(sd1, cats(60) + ", " + cats(20), comma_backtrack=0)) == [
        row([CAT] * 60 + [COMMA] + [CAT] * 14), row([CAT] * 6)]


@pytest.mark.parametrize("before, moves", [(55, True), (54, False)])
def test_comma_backtrack_reaches_exactly_20_ids(sd1, before, moves):
    """The comma at index 55 is 20 ids from the end of a full chunk (75 - 55): it moves the
    words; at index 54, 21 ids away, the chunk is cut at 75."""
    t = tokenize(sd1, cats(before) + ", " + cats(30))
    first = [CAT] * before + [COMMA]
    if moves:
        assert ids(t) == [row(first), row([CAT] * 30)]
    else:
        assert ids(t) == [row(first + [CAT] * (74 - before)), row([CAT] * (before - 44))]


def test_a_comma_that_starts_a_chunk_is_no_backtrack_point(sd1):
    # 75 cats fill the chunk; the comma opens the next and (as in A1111) is not remembered
    # there, so the next full chunk is cut at 75.
    t = tokenize(sd1, cats(75) + ", " + cats(80))
    assert ids(t) == [row([CAT] * 75), row([COMMA] + [CAT] * 74), row([CAT] * 6)]


def test_comma_backtrack_with_a_comma_at_the_end_of_a_full_chunk(sd1):
    t = tokenize(sd1, cats(74) + ", " + cats(3))
    assert ids(t) == [row([CAT] * 74 + [COMMA]), row([CAT] * 3)]


def test_break(sd1):
    assert ids(tokenize(sd1, "cat BREAK cat")) == [row([CAT]), row([CAT])]
    assert ids(tokenize(sd1, "BREAK cat")) == [row([]), row([CAT])]  # an empty first chunk
    assert ids(tokenize(sd1, "cat BREAK")) == [row([CAT])]  # nothing after: no chunk
    assert ids(tokenize(sd1, cats(75) + " BREAK cat")) == [row([CAT] * 75), row([CAT])]
    assert ids(tokenize(sd1, "cat BREAK cat", syntax="plain")) == [row(sd1.encode("cat break cat"))]
    t = tokenize(sd1, "(cat BREAK cat)")  # not a break inside brackets (see test_parse_edge_cases)
    assert ids(t) == [row(sd1.encode("cat break cat"))]
    assert t.weights[0, 0, 1:4].tolist() == pytest.approx([1.1, -1.1, 1.1])


def test_weights_follow_their_tokens(sd1):
    t = tokenize(sd1, "a (red:1.5) [fluffy] cat")
    assert ids(t) == [row(sd1.encode("a red fluffy cat"))]
    w = t.weights[0, 0]
    assert w.dtype == torch.float32
    assert w[:6].tolist() == pytest.approx([1.0, 1.0, 1.5, 1 / 1.1, 1.0, 1.0])
    assert (w[6:] == 1).all()


def test_each_piece_is_tokenized_on_its_own(sd1):
    """As A1111 does: brackets inside a word split it into two BPE words."""
    assert ids(tokenize(sd1, "sun(flower)")) == [row(sd1.encode("sun") + sd1.encode("flower"))]
    assert sd1.encode("sun") + sd1.encode("flower") != sd1.encode("sunflower")


def test_sd2_pads_with_zero(sd2):
    t = tokenize(sd2, [cats(76), "a (cat:1.2)"])
    assert t.pad_id == 0
    assert ids(t, 0) == [row([CAT] * 75, pad=0), row([CAT], pad=0)]
    assert ids(t, 1) == [row([320, CAT], pad=0), row([], pad=0)]  # padded with an empty chunk


def test_sdxl_encoders_chunk_alike(sd1, sd2):
    """CLIP-L (SD 1's tokenizer) and OpenCLIP-bigG (SD 2's) split a prompt at the same places;
    only the padding differs."""
    prompt = "a (photo:1.3) of [[an astronaut]], riding ((a horse)), emb, " * 14
    l, g = (tokenize(t, prompt, embeddings={"emb": 2}) for t in (sd1, sd2))
    assert l.chunks == g.chunks == 3
    assert ((l.ids == g.ids) | (l.ids == END) & (g.ids == 0)).all()
    assert torch.equal(l.weights, g.weights) and l.placements == g.placements
    assert len(l.placements) == 14


def test_prompts_of_a_batch_and_their_negatives_pad_to_the_same_chunks(sd1):
    t = tokenize(sd1, ["cat", cats(80)])
    assert t.ids.shape == (2, 2, 77) and ids(t, 0) == [row([CAT]), row([])]
    negative = tokenize(sd1, "dog")
    a, b = pad_chunks(t, negative)
    assert a is not t and torch.equal(a.ids, t.ids)
    assert b.ids.shape == (1, 2, 77) and ids(b) == [row(sd1.encode("dog")), row([])]
    assert (b.weights == 1).all()



def test_pad_conds_false_keeps_each_chunk_count_and_guides_in_two_calls():
    """A1111 without "Pad conds": a 2-chunk prompt and a 1-chunk negative are encoded as they
    are, and the U-Net runs the two halves of guidance separately."""
    import ldm
    pipe = ldm.load()
    prompt, negative = "a red circle, " + cats(90), "a blue square"
    cond, uncond = pipe.encode_prompt(prompt, negative, pad_conds=False)
    padded_cond, padded_uncond = pipe.encode_prompt(prompt, negative)
    assert cond["context"].shape[1] == 154 and uncond["context"].shape[1] == 77
    assert torch.equal(cond["context"], padded_cond["context"])
    assert torch.equal(uncond["context"], padded_uncond["context"][:, :77])
    calls = []
    hook = pipe.unet.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(tuple(kwargs["context"].shape)),
        with_kwargs=True)
    seed = fresh_seed()
    # guidance at both steps (the shipped model's default skips it below t = 200)
    run = dict(steps=2, seed=seed, output_type="latent", sampler="euler_a",
               cfg_interval=(0, 1000))
    try:
        separate = pipe.txt2img(prompt, negative_prompt=negative, pad_conds=False, **run)
        assert calls == [(1, 77, 64), (1, 154, 64)] * 2
        calls.clear()
        batched = pipe.txt2img(prompt, negative_prompt=negative, **run)
        assert calls == [(2, 154, 64)] * 2
        # one chunk each: nothing to pad, one batch either way, the same numbers
        calls.clear()
        short = [pipe.txt2img("a red circle", negative_prompt=negative, pad_conds=pad, **run)
                 for pad in (False, True)]
        assert calls == [(2, 77, 64)] * 4 and torch.equal(*short)
    finally:
        hook.remove()
    assert rel_error(separate, batched) > 1e-3  # the empty chunk changes the negative's ε
    with pytest.raises(TypeError, match="pad_conds must be True or False"):
        pipe.encode_prompt("a", pad_conds="no")

def test_tokenize_checks_its_arguments(sd1):
    with pytest.raises(ValueError, match="empty list"):
        tokenize(sd1, [])
    with pytest.raises(ValueError, match="comma_backtrack must be an integer >= 0"):
        tokenize(sd1, "a", comma_backtrack=-1)
    with pytest.raises(ValueError, match="syntax must be one of"):
        tokenize(sd1, "a", syntax="compel")


# ---------------------------------------------------------------- embeddings
def test_an_embedding_occupies_its_vectors_slots_with_its_weight(sd1):
    t = tokenize(sd1, "a (charturner:1.2) cat", embeddings={"charturner": 3})
    assert ids(t) == [row([320] + [PLACEHOLDER_ID] * 3 + [CAT])]
    assert [(p.prompt, p.chunk, p.start, p.length, p.trigger) for p in t.placements] == [
        (0, 0, 2, 3, "charturner")]
    assert t.weights[0, 0, 2:5].tolist() == pytest.approx([1.2] * 3)
    assert len(sd1.encode("charturner")) > 1  # a word of several BPE ids, matched whole


def test_an_embedding_is_never_split_across_chunks(sd1):
    t = tokenize(sd1, cats(73) + " emb cat", embeddings={"emb": torch.zeros(3, 8)})
    assert ids(t) == [row([CAT] * 73), row([PLACEHOLDER_ID] * 3 + [CAT])]
    assert [(p.chunk, p.start) for p in t.placements] == [(1, 1)]


def test_comma_backtrack_moves_an_embedding_with_its_placeholders(sd1):
    """A1111 leaves the vectors in the first chunk (at its padding); they go with their slots."""
    t = tokenize(sd1, cats(60) + ", emb " + cats(20), embeddings={"emb": 3})
    assert ids(t) == [row([CAT] * 60 + [COMMA]), row([PLACEHOLDER_ID] * 3 + [CAT] * 20)]
    assert [(p.chunk, p.start, p.length) for p in t.placements] == [(1, 1, 3)]


def test_the_longest_trigger_matches_first(sd1):
    t = tokenize(sd1, "red cat, red", embeddings={"red": 1, "red cat": 2})
    assert ids(t) == [row([PLACEHOLDER_ID] * 2 + [COMMA, PLACEHOLDER_ID])]
    assert [(p.start, p.trigger) for p in t.placements] == [(1, "red cat"), (4, "red")]


def test_embedding_triggers_are_checked(sd1):
    for embeddings, message in [
        ({"": 1}, "trigger '' must be a non-empty word"),
        ({"emb": 0}, "embedding 'emb' must have 1 to 75 vectors"),
        ({"emb": 76}, "embedding 'emb' must have 1 to 75 vectors"),
        ({"emb": True}, "embedding 'emb' must have 1 to 75 vectors"),
        ({"emb": torch.zeros(768)}, r"must be a \(count, D\) tensor, got shape \(768,\)"),
        ({"Emb": 1, "emb": 2}, "triggers 'Emb' and 'emb' are the same tokens"),
    ]:
        with pytest.raises(ValueError, match=message):
            tokenize(sd1, "emb", embeddings=embeddings)


# ---------------------------------------------------------------- encoding
@pytest.fixture(scope="module")
def clip():
    return randomize_(CLIPTextModel(CLIP_TINY), seed=1).eval()


@pytest.fixture(scope="module")
def open_clip():
    return randomize_(OpenCLIPTextModel(OPEN_CLIP_TINY), seed=2).eval()


def families(request):
    return [(request.getfixturevalue("sd1"), request.getfixturevalue("clip")),
            (request.getfixturevalue("sd2"), request.getfixturevalue("open_clip"))]


WEIGHTED = "a (photo:1.3) of [[an astronaut]], riding ((a horse)), " * 16  # 3 chunks


@pytest.fixture(params=["sd1", "sd2"])
def family(request):
    tokenizer, model = families(request)[request.param == "sd2"]
    return tokenizer, model


@torch.no_grad()
def test_original_emphasis_is_a1111s_formula_per_chunk(family):
    """A1111's EmphasisOriginal on one prompt: z·w, then × mean(z) / mean(z·w) over the chunk,
    recomputed here in float64 from each chunk encoded on its own."""
    tokenizer, model = family
    t = tokenize(tokenizer, WEIGHTED)
    assert t.chunks == 3 and (t.weights != 1).any(dim=-1).all()
    ours = encode(t, model)
    assert ours.shape == (1, 3 * 77, 32)
    for k in range(3):
        z = model(t.ids[:, k]).double()
        w = t.weights[:, k, :, None].double()
        expected = z * w * (z.mean() / (z * w).mean())
        assert rel_error(ours[:, 77 * k : 77 * (k + 1)], expected) < 1e-6
    assert rel_error(ours, encode(t, model, emphasis="no_norm")) > 1e-3  # the norm matters


@torch.no_grad()
def test_no_norm_emphasis_multiplies(family):
    tokenizer, model = family
    t = tokenize(tokenizer, WEIGHTED)
    z = torch.cat([model(t.ids[:, k]) for k in range(t.chunks)], dim=1)
    expected = z * t.weights.flatten(1)[..., None]
    assert torch.equal(encode(t, model, emphasis="no_norm"), expected)


@torch.no_grad()
def test_comfy_emphasis_interpolates_from_the_empty_prompt(family):
    """ComfyUI's encode_token_weights: (z − e)·w + e for the tokens of weight ≠ 1, e the
    empty prompt's encoding (start, end, padding) at the same position."""
    tokenizer, model = family
    t = tokenize(tokenizer, WEIGHTED)
    e = model(tokenizer("")).double()  # (1, 77, D)
    ours = encode(t, model, emphasis="comfy")
    for k in range(3):
        z = model(t.ids[:, k]).double()
        w = t.weights[:, k, :, None].double()
        expected = torch.where(w != 1, (z - e) * w + e, z)
        assert rel_error(ours[:, 77 * k : 77 * (k + 1)], expected) < 1e-6
    unweighted = t.weights[0, 0] == 1
    assert torch.equal(ours[0, :77][unweighted], model(t.ids[:, 0])[0][unweighted])


@torch.no_grad()
@pytest.mark.parametrize("syntax", ["a1111", "plain"])
@pytest.mark.parametrize("emphasis", ["original", "comfy"])
def test_short_plain_prompts_encode_bit_identically_to_the_tokenizer_path(family, syntax, emphasis):
    tokenizer, model = family
    prompts = ["a photo of a cat", "", cats(75), "a beautiful landscape, mountains, lake, sunset"]
    assert torch.equal(encode(tokenize(tokenizer, prompts, syntax=syntax), model,
                              emphasis=emphasis), model(tokenizer(prompts)))


@torch.no_grad()
def test_a_prompt_does_not_depend_on_its_batch(family):
    tokenizer, model = family
    prompts = [WEIGHTED, "a (cat:0.7) on a mat", "a cat"]
    for emphasis in ("original", "comfy"):
        together = encode(tokenize(tokenizer, prompts), model, emphasis=emphasis)
        for b, prompt in enumerate(prompts):
            alone = encode(tokenize(tokenizer, prompt), model, emphasis=emphasis)
            assert rel_error(together[b, : alone.shape[1]], alone[0]) < 1e-6
            # shorter prompts continue with the empty prompt's encoding
            empty = model(tokenizer(""))[0]
            for k in range(alone.shape[1] // 77, 3):
                assert rel_error(together[b, 77 * k : 77 * (k + 1)], empty) < 1e-6


@torch.no_grad()
def test_negative_prompt_padded_with_the_empty_prompts_encoding(family):
    tokenizer, model = family
    cond, uncond = pad_chunks(tokenize(tokenizer, WEIGHTED), tokenize(tokenizer, "blurry"))
    c, u = encode(cond, model), encode(uncond, model)
    assert c.shape == u.shape == (1, 3 * 77, 32)
    assert torch.equal(u[:, :77], model(tokenizer("blurry")))
    assert torch.equal(u[:, 77:154], model(tokenizer(""))) and torch.equal(u[:, 154:], u[:, 77:154])


@torch.no_grad()
def test_embedding_vectors_replace_their_placeholders(family):
    """An embedding whose vectors are the token embeddings of "red fluffy" encodes exactly as
    the words themselves, weights and chunk position included."""
    tokenizer, model = family
    table = find_token_embedding(model)
    vectors = table.weight[tokenizer.encode("red fluffy")].clone()  # (2, D)
    prompt = cats(74) + ", a (charturner:1.2) cat"
    t = tokenize(tokenizer, prompt, embeddings={"charturner": vectors})
    reference = tokenize(tokenizer, cats(74) + ", a (red fluffy:1.2) cat")
    assert torch.equal(torch.where(t.ids == PLACEHOLDER_ID, reference.ids, t.ids), reference.ids)
    assert torch.equal(t.weights, reference.weights)
    got = encode(t, model, embeddings={"charturner": vectors}, token_embedding=table)
    assert torch.equal(got, encode(reference, model))
    assert len(table._forward_hooks) == 0  # the hook is gone afterwards
    assert not torch.equal(encode(t, model, embeddings={"charturner": vectors * 2},
                                  token_embedding=table), got)


def test_embedding_vectors_stay_out_of_other_threads(sd1, clip):
    """Another thread running the same text encoder meanwhile sees its own ids' embeddings."""
    table = find_token_embedding(clip)
    t = tokenize(sd1, "a emb cat", embeddings={"emb": 2})
    other = {}

    def encode_chunk(ids):
        thread = threading.Thread(target=lambda: other.setdefault("z", clip(ids).detach()))
        thread.start()
        thread.join()
        return clip(ids)

    with torch.no_grad():
        got = encode(t, encode_chunk, embeddings={"emb": torch.ones(2, 32)}, token_embedding=table)
        assert torch.equal(other["z"], clip(t.ids[:, 0]))  # the placeholder ids' own embeddings
        assert not torch.equal(got, other["z"])


def test_embedding_vectors_are_checked(sd1, clip):
    t = tokenize(sd1, "a emb", embeddings={"emb": 2})
    table = find_token_embedding(clip)
    with pytest.raises(ValueError, match="the prompts hold embeddings"):
        encode(t, clip)
    with pytest.raises(ValueError, match=r"embedding 'emb' must be a \(2, 32\) tensor for this "
                                         r"text encoder, got \(2, 768\)"):
        encode(t, clip, embeddings={"emb": torch.zeros(2, 768)}, token_embedding=table)
    with pytest.raises(ValueError, match=r"embedding 'emb' must be a \(2, 32\) tensor .* got None"):
        encode(t, clip, embeddings={}, token_embedding=table)
    with pytest.raises(ValueError, match="no nn.Embedding named token_embedding"):
        find_token_embedding(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_pooled_vectors_come_from_the_first_chunk(sd1, clip):
    def with_pooled(ids):
        z = clip(ids)
        return z, z[:, 0] * 0 + ids[:, 1, None].float()  # (B, D), marks the chunk's first word

    t = tokenize(sd1, cats(75) + " dog")
    context, pooled = encode(t, with_pooled)
    assert torch.equal(context, encode(t, clip))
    assert (pooled == CAT).all()


def test_encode_checks_its_arguments(sd1, clip):
    t = tokenize(sd1, "a (cat:1.2)")
    with pytest.raises(ValueError, match="emphasis must be one of"):
        encode(t, clip, emphasis="A1111")
    with pytest.raises(ValueError, match=r"must return hidden states \(B, T, D\) = \(1, 77, D\) "
                                         r"for ids \(1, 77\), got \(77, 32\)"):
        encode(t, lambda ids: clip(ids)[0])
    with pytest.raises(ValueError, match="needs the encoding of the empty prompt"):
        weigh(torch.zeros(1, 77, 4), t.weights[:, 0], "comfy")
    zero_mean = torch.zeros(1, 77, 4)
    with pytest.raises(ValueError, match="non-finite"):
        weigh(zero_mean, t.weights[:, 0], "original")


def test_weigh_keeps_the_dtype_and_unweighted_prompts(sd1):
    z = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(3)).half()
    weights = torch.ones(2, 77)
    weights[1, 3] = 1.5
    out = weigh(z, weights)
    assert out.dtype == torch.float16
    assert torch.equal(out[0], z[0]) and not torch.equal(out[1], z[1])
    assert weigh(z, torch.ones(2, 77)) is z


@torch.no_grad()
def test_comfy_emphasis_matches_compel(sd1, clip, tmp_path):
    """compel's build_weighted_embedding_tensor (the same formula, ComfyUI's), run on
    transformers' CLIPTextModel with the tiny model's weights, over our chunks."""
    pytest.importorskip("compel")
    transformers = pytest.importorskip("transformers")
    from compel.embeddings_provider import EmbeddingsProvider
    from helpers import write_clip_vocab_files
    from test_clip_text import reference_from

    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(
        write_clip_vocab_files(tmp_path), pad_token="<|endoftext|>", model_max_length=77)
    provider = EmbeddingsProvider(hf_tokenizer, reference_from(clip), truncate=False)
    t = tokenize(sd1, WEIGHTED)
    theirs = provider.build_weighted_embedding_tensor(t.ids.flatten(), t.weights.flatten())
    ours = encode(t, clip, emphasis="comfy")
    assert theirs.shape == ours.shape == (1, 3 * 77, 32)
    assert rel_error(ours, theirs) < 1e-5
