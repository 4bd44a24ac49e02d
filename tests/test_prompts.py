"""Prompts read as AUTOMATIC1111's web UI reads them. A1111 cannot be installed here, so its rules are stated in the
tests: the parser and schedule examples are those of its `modules/prompt_parser.py` (docstrings and doctests), and
the context is checked against transformers' CLIPTextModel run on the same chunks and weighted by A1111's formula."""

from pathlib import Path

import numpy as np
import pytest
import torch
from reference import assert_close, ldm_key_shapes, our_models, random_checkpoint, reference_clip

from sd.autoencoder import VAEConfig
from sd.clip import CLIPConfig
from sd.diffusion import UNetConfig
from sd.guidance import Guidance, predict
from sd.model_loader import load_models
from sd.pipeline import generate
from sd.prompts import chunks, encode_prompt, load_embeddings, parse_emphasis, schedule, split_and
from sd.prompts import main as prompts_main
from sd.shapes import judge

CFGS = CLIPConfig.tiny(), VAEConfig.tiny(), UNetConfig.tiny()


@pytest.fixture(scope="module")
def checkpoint():
    return random_checkpoint(ldm_key_shapes(*CFGS), seed=30)


@pytest.fixture(scope="module")
def models(checkpoint):
    return our_models(checkpoint, *CFGS)


@pytest.fixture(scope="module")
def ref_clip(checkpoint, tmp_path_factory):
    return reference_clip(checkpoint, CFGS[0], tmp_path_factory.mktemp("clip"))


# -- A1111's parser, by its own examples ---------------------------------------------------------------------------


A1111_HOUSE = [  # its docstring's longest example
    ("a ", 1.0),
    ("house", 1.5730000000000004),
    (" ", 1.1),
    ("on", 1.0),
    (" a ", 1.1),
    ("hill", 0.55),
    (", sun, ", 1.1),
    ("sky", 1.4641000000000006),
    (".", 1.1),
]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", A1111_HOUSE),
        ("(red: 1.5 ) circle", [("red", 1.5), (" circle", 1.0)]),  # spaces around the weight
        ("(a:b)", [("a:b", 1.1)]),  # not a number: text, at 1.1
        ("(a :1.2)", [("a ", 1.2)]),  # a space before the colon stays in the text
        ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),  # A1111 raises; kept as text here
        ("[a] \\\\ b", [("a", 1 / 1.1), (" \\ b", 1.0)]),
        ("", [("", 1.0)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("a-BREAK-b", [("a-", 1.0), ("BREAK", -1.0), ("-b", 1.0)]),
        ("BREAKFAST", [("BREAKFAST", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # weighted inside brackets: no longer a break
    ],
)
def test_emphasis_is_parsed_as_a1111_parses_it(text, expected):
    assert parse_emphasis(text) == expected


A1111_SCHEDULES = {  # prompt -> its schedule at 10 steps (A1111's doctests)
    "test": [(10, "test")],
    "a [b:3]": [(3, "a "), (10, "a b")],
    "a [b: 3]": [(3, "a "), (10, "a b")],
    "a [[[b]]:2]": [(2, "a "), (10, "a [[b]]")],
    "[(a:2):3]": [(3, ""), (10, "(a:2)")],
    "a [b : c : 1] d": [(1, "a b  d"), (10, "a  c  d")],
    "a[b:[c:d:2]:1]e": [(1, "abe"), (2, "ace"), (10, "ade")],
    "a [unbalanced": [(10, "a [unbalanced")],
    "a [b:.5] c": [(5, "a  c"), (10, "a b c")],
    # A1111's docstring claims [(5, "a  c"), (10, "a {b|d{ c")]; its grammar rejects the prompt, so it stays as it is
    "a [{b|d{:.5] c": [(10, "a [{b|d{:.5] c")],
    "((a][:b:c [d:3]": [(3, "((a][:b:c "), (10, "((a][:b:c d")],
    "[a|(b:1.1)]": [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)],
    "[fe|]male": [(s, "female" if s % 2 else "male") for s in range(1, 11)],
    "[fe|||]male": [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)],
    # the current rules: a "." makes a fraction even at 1 or more, capped at the steps; "1e1" is 10
    "a [b:c:1.5]": [(10, "a b")],
    "[a:b:1e1]": [(10, "a")],
    "[a:b:0]": [(10, "b")],  # below 1: `to` from the first step
    "[a::0.3] z": [(3, "a z"), (10, " z")],
    "[circle:square:0.5]": [(5, "circle"), (10, "square")],
    "a | b": [(10, "a | b")],  # "|" outside brackets: not A1111's syntax, used as it is
}


@pytest.mark.parametrize("prompt", list(A1111_SCHEDULES))
def test_prompt_edit_schedules_are_a1111s(prompt):
    assert schedule(prompt, 10) == A1111_SCHEDULES[prompt]


def test_and_splits_with_weights_as_a1111():
    assert split_and("a cat AND a dog:0.5") == [("a cat", 1.0), (" a dog", 0.5)]
    assert split_and("a still, 16:9") == [("a still, 16", 9.0)]  # A1111 reads a trailing :number as a weight
    assert split_and("ANDROID") == [("ANDROID", 1.0)]


# -- chunks and the context -------------------------------------------------------------------------------------------


def words(models, chunk) -> str:
    return models.tokenizer.decode([t for t in chunk.tokens if t != models.tokenizer.end_id])


def test_break_closes_a_chunk_where_a1111_does(models):
    assert [words(models, c) for c in chunks(models, "a red circle BREAK on blue")] == ["a red circle", "on blue"]
    assert [words(models, c) for c in chunks(models, "BREAK a")] == ["", "a"]  # a leading BREAK: an empty chunk
    assert [words(models, c) for c in chunks(models, "a BREAK")] == ["a"]  # a trailing one: nothing
    assert [words(models, c) for c in chunks(models, "a BREAK BREAK b")] == ["a", "", "b"]
    assert len(chunks(models, "a BREAKFAST b")) == 1


def test_full_chunks_move_the_words_after_a_late_comma_to_the_next(models):
    prompt = ", ".join(["a big red round circle"] * 20)  # 6 tokens a phrase: commas at 5, 11, ..., 71
    end, comma = models.tokenizer.end_id, models.tokenizer.vocab[",</w>"]
    packed = chunks(models, prompt)
    assert packed[0].tokens[71] == comma and packed[0].tokens[72:] == [end] * 3, "cut after the comma at 71"
    assert words(models, packed[1]).startswith("a big red round circle ,")
    plain = chunks(models, prompt, comma_backtrack=0)
    assert end not in plain[0].tokens, "without the backtrack a chunk fills to 75"
    late = chunks(models, prompt, comma_backtrack=3)  # the comma is 4 tokens back: too far
    assert end not in late[0].tokens


def a1111_context(models, ref_clip, prompt: str, emphasis: str = "original") -> torch.Tensor:
    """transformers' CLIP on each chunk, weighted by A1111's "Original" emphasis: z * w, times mean(z) / mean(z * w)."""
    out = []
    for chunk in chunks(models, prompt, emphasis):
        tokens = torch.tensor([[models.tokenizer.start_id, *chunk.tokens, models.tokenizer.end_id]])
        z = ref_clip(tokens).last_hidden_state
        weights = torch.tensor([1.0, *chunk.weights, 1.0])[None, :, None]
        original_mean = z.mean()
        z = z * weights
        out.append(z * (original_mean / z.mean()) if emphasis == "original" else z)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize(
    "prompt",
    [
        "a (red:1.4) circle on a [blue] background",
        "a ((red)) circle BREAK on a blue background",
        ", ".join(f"a (shape:{1 + i / 10}) number {i}" for i in range(20)),  # three chunks
    ],
    ids=["weighted", "break", "long"],
)
@pytest.mark.parametrize("emphasis", ["original", "no_norm"])
def test_weighted_and_long_contexts_equal_clip_on_the_chunks_weighted_as_a1111(models, ref_clip, prompt, emphasis):
    with torch.no_grad():
        ours = encode_prompt(models, prompt, emphasis=emphasis)
        expected = a1111_context(models, ref_clip, prompt, emphasis)
    assert ours.shape == expected.shape and ours.shape[1] % 77 == 0, (ours.shape, expected.shape)
    assert_close(ours, expected, f"{emphasis} context of {prompt[:40]!r}")


def test_a_plain_prompt_gives_todays_context_exactly(models):
    with torch.no_grad():
        plain = encode_prompt(models, "a red circle on a blue background")
        framed = models.clip(models.tokenizer(["a red circle on a blue background"]))
    assert torch.equal(plain, framed)


def test_a_plain_prompt_equals_diffusers_encode_prompt(checkpoint, models, tmp_path):
    from reference import diffusers_pipelines

    pipeline, _ = diffusers_pipelines(checkpoint, *CFGS, tmp_path)
    prompt = "a red circle on a blue background, small, top left"
    theirs, _ = pipeline.encode_prompt(prompt, "cpu", 1, False)
    with torch.no_grad():
        assert_close(encode_prompt(models, prompt), theirs, "plain prompt against diffusers' encode_prompt")


def test_two_unweighted_chunks_are_the_two_encodings_side_by_side(models):
    first, second = "a red circle on a blue background", "small and bright, top left"
    with torch.no_grad():
        both = encode_prompt(models, f"{first} BREAK {second}")
        apart = torch.cat([encode_prompt(models, first), encode_prompt(models, second)], dim=1)
    assert torch.equal(both, apart)


def test_emphasis_none_reads_brackets_as_text(models):
    with torch.no_grad():
        assert torch.equal(
            encode_prompt(models, "a (red) circle", emphasis="none"),
            models.clip(models.tokenizer(["a (red) circle"])),
        )


# -- in the pipeline ------------------------------------------------------------------------------------------------


def test_a_long_prompt_and_a_short_negative_take_separate_unet_calls(models):
    prompt, negative = ", ".join(["a red circle"] * 30), "blurry"
    with torch.no_grad():
        guidance = Guidance.build(models, [prompt], [negative], 1, 5, 7.5)
        x, t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
        eps = guidance(models.diffusion, x, t, step=0)
        long, short = encode_prompt(models, prompt), encode_prompt(models, negative)
        assert long.shape[1] == 154 and short.shape[1] == 77
        eps_prompt, eps_negative = models.diffusion(x, t, long), models.diffusion(x, t, short)
    assert_close(eps, eps_negative + 7.5 * (eps_prompt - eps_negative), "guided noise from two context lengths")


def test_and_combines_the_sub_prompts_by_their_weights(models):
    with torch.no_grad():
        guidance = Guidance.build(models, ["a red circle AND a blue square:0.5"], [""], 1, 5, 3.0)
        x, t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor(300)
        eps = guidance(models.diffusion, x, t, step=0)
        e = {p: models.diffusion(x, t, encode_prompt(models, p)) for p in ("", "a red circle", " a blue square")}
    expected = e[""] + 3.0 * ((e["a red circle"] - e[""]) + 0.5 * (e[" a blue square"] - e[""]))
    assert_close(eps, expected, "composable guidance")


def test_prompt_edits_change_the_context_at_a1111s_step(models):
    guidance = Guidance.build(models, ["a [red:blue:0.5] circle"], [""], 1, 10, 7.5)
    ((sub, _),) = guidance.positives[0]
    with torch.no_grad():
        red, blue = encode_prompt(models, "a red circle"), encode_prompt(models, "a blue circle")
    # A1111 uses the first entry whose end step is >= the step counted from 0: red for steps 0..5
    assert all(torch.equal(sub.at(i), red) for i in range(6)) and all(torch.equal(sub.at(i), blue) for i in (6, 9))


def test_predict_keeps_the_rows_order_across_context_lengths(models):
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    contexts = [encode_prompt(models, p) for p in ("a", "b BREAK c", "d")]
    with torch.no_grad():
        rows = [(0, contexts[0]), (1, contexts[1]), (1, contexts[2])]
        out = predict(models.diffusion, x, torch.tensor(100), rows)
        for k, (b, context) in enumerate(rows):
            assert_close(out[k], models.diffusion(x[b : b + 1], torch.tensor(100), context)[0], f"row {k}")


def test_generate_takes_a1111_prompts(models):
    out = generate(
        "a (red:1.3) [circle:square:0.5] AND a blue background:0.7",
        models,
        negative_prompt=", ".join(["blurry"] * 60),
        steps=3,
        width=32,
        height=32,
        seed=3,
        output_type="latent",
        progress=False,
    )
    assert torch.isfinite(out.images).all() and out.images.shape == (1, 4, 4, 4)
    assert out.parameters.prompts == ["a (red:1.3) [circle:square:0.5] AND a blue background:0.7"]


def redness(image) -> float:
    """How red the judge's foreground is: its mean red less the mean of green and blue, 0..255."""
    _, _, mask = judge(image)
    rgb = np.asarray(image, dtype=np.float32)[mask]
    return float((rgb[:, 0] - rgb[:, 1:].mean(1)).mean()) if mask.any() else 0.0


@pytest.fixture(scope="module")
def built_in():
    return load_models()


def test_on_the_built_in_model_the_weight_of_red_changes_how_red_the_circle_is(built_in):
    """Measured, not the direction one might guess: this model draws a red circle even at weight 0 (CLIP's causal
    attention carries "red" into every later token), and weights above 1 push the red token's vector out of what
    it was trained on: over these 8 seeds redness falls from 175 at weight 0 to 163 at 1 and 145 at 2."""

    def mean_redness(weight: float) -> float:
        prompt = f"a (red:{weight}) circle on a blue background"
        images = generate([prompt] * 8, built_in, seed=0, width=64, height=64, progress=False).images
        return float(np.mean([redness(i) for i in images]))

    weak, strong = mean_redness(0.6), mean_redness(1.4)
    assert weak - strong > 3, f"redness {weak:.1f} at weight 0.6 against {strong:.1f} at 1.4: emphasis did nothing"


def test_on_the_built_in_model_an_edited_shape_and_a_long_prompt_draw_shapes(built_in):
    edited = generate(["[circle:square:0.5] on a blue background"] * 4, built_in, seed=0, progress=False).images
    shapes = [judge(image)[1] for image in edited]
    assert all(shape in ("circle", "square") for shape in shapes), shapes
    long = "a red circle on a blue background, " + ", ".join(["small", "bright", "round", "plain"] * 15)
    assert len(chunks(built_in, long)) == 2 and len(built_in.tokenizer.encode(long)) >= 120
    (image,) = generate(long, built_in, seed=0, progress=False).images
    assert judge(image)[:2] == ("red", "circle"), judge(image)[:2]


def test_python_m_sd_prompts_shows_the_fragments_schedule_and_chunks(capsys):
    assert prompts_main(["a (red:1.3) [circle:square:0.5] BREAK on blue", "--steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "up to step 5 of 10: 'a (red:1.3) circle BREAK on blue'" in out and "1.300  'red'" in out
    assert "chunk 1: 2 tokens: 'on blue'" in out


# -- textual inversion ------------------------------------------------------------------------------------------------


def save_embedding(layout: str, vectors: torch.Tensor, folder: Path) -> Path:
    """An embedding file as A1111 (.pt, .safetensors) or diffusers (learned_embeds.bin / .safetensors) write it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if layout == "a1111.pt":
        path = folder / "shinything.pt"
        state = {
            "string_to_token": {"*": torch.tensor(265)},
            "string_to_param": {"*": torch.nn.Parameter(vectors)},
            "name": "shinything",
            "step": 100,
            "sd_checkpoint": "0123456789",
            "sd_checkpoint_name": "model",
        }
        torch.save(state, path)
    elif layout == "a1111.safetensors":
        path = folder / "shinything.safetensors"
        save_file({"emb_params": vectors.contiguous()}, path)
    elif layout == "diffusers.bin":
        path = folder / "shinything.bin"
        torch.save({"<shinything>": vectors[0] if len(vectors) == 1 else vectors}, path)
    else:
        path = folder / "shinything.safetensors"
        save_file({"<shinything>": vectors.contiguous()}, path)
    return path


@pytest.mark.parametrize("vectors", [1, 3], ids=["one-vector", "three-vectors"])
@pytest.mark.parametrize("layout", ["a1111.pt", "a1111.safetensors", "diffusers.bin", "diffusers.safetensors"])
def test_textual_inversion_equals_diffusers(checkpoint, models, tmp_path, layout, vectors):
    from reference import diffusers_pipelines

    width = CFGS[0].width
    embedding = torch.randn(vectors, width, generator=torch.Generator().manual_seed(vectors)) * 0.5
    path = save_embedding(layout, embedding, tmp_path / "emb")
    pipeline, _ = diffusers_pipelines(checkpoint, *CFGS, tmp_path / "diffusers")
    pipeline.load_textual_inversion(str(path), token="<shinything>")
    theirs, _ = pipeline.encode_prompt("a <shinything> circle", "cpu", 1, False)

    models.embeddings.clear()
    assert load_embeddings(models, path) == ["shinything"]
    with torch.no_grad():
        ours = encode_prompt(models, "a shinything circle")
        weighted = encode_prompt(models, "a (shinything:1.2) circle")
    assert_close(ours, theirs, f"{layout} embedding of {vectors} vectors")
    assert not torch.equal(weighted, ours), "emphasis applies to an embedding's vectors"
    models.embeddings.clear()


def test_embeddings_never_straddle_a_chunk_and_work_in_a_folder(models, tmp_path):
    save_embedding("a1111.safetensors", torch.randn(3, CFGS[0].width), tmp_path / "emb")
    models.embeddings.clear()
    assert load_embeddings(models, tmp_path / "emb") == ["shinything"]
    prompt = "word " * 73 + "shinything"  # 73 tokens, then 3 slots that do not fit in the 2 left
    packed = chunks(models, prompt)
    assert len(packed) == 2 and packed[1].embeddings == [(0, "shinything")], [c.embeddings for c in packed]
    models.embeddings.clear()


def test_an_embedding_of_another_width_is_refused(models, tmp_path):
    from safetensors.torch import save_file

    save_file({"clip_l": torch.zeros(2, 768 + 1)}, tmp_path / "sdxl.safetensors")
    with pytest.raises(ValueError, match="an embedding 769 wide; this model's CLIP takes 128"):
        load_embeddings(models, tmp_path / "sdxl.safetensors")


def test_padding_makes_one_context_length_with_empty_prompt_chunks(models):
    prompt = ", ".join(["a red circle"] * 30)
    with torch.no_grad():
        guidance = Guidance.build(models, [prompt], ["blurry"], 1, 5, 7.5, pad_prompts=True)
        negative = guidance.negatives[0].at(0)
        expected = torch.cat([encode_prompt(models, "blurry"), encode_prompt(models, "")], dim=1)
    assert torch.equal(negative, expected) and guidance.positives[0][0][0].at(0).shape[1] == 154


def test_an_extra_network_tag_is_kept_as_text_and_reported(models):
    with pytest.warns(UserWarning, match="<lora:shiny:0.8> is A1111's extra-network syntax"):
        Guidance.build(models, ["a cat <lora:shiny:0.8>"], [""], 1, 5, 7.5)


def test_the_cli_loads_embeddings_and_pads_prompts(checkpoint, tmp_path, capsys):
    from safetensors.torch import save_file

    from sd.cli import main

    save_file(checkpoint, tmp_path / "tiny.safetensors")
    save_embedding("a1111.safetensors", torch.randn(2, CFGS[0].width), tmp_path / "emb")
    argv = ["a shinything circle", "--ckpt", str(tmp_path / "tiny.safetensors"), "-W", "32", "-H", "32"]
    argv += ["--steps", "2", "--seed", "5", "--embeddings", str(tmp_path / "emb"), "--pad-prompts"]
    assert main([*argv, "--outdir", str(tmp_path / "out")]) == 0
    assert "embeddings: shinything" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["00000-5.png"]
