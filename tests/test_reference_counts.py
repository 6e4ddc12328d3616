"""The reference code's counts from shapes (tintc/report/reference_counts.py), against the figures its
code prints and the counts DESIGN §6 made of its modules; and the report's like-with-like section."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import GPT2Config, OPTConfig

from tintc import pipeline
from tintc.report import counts as R
from tintc.report import reference_counts as C
from tintc.report import render as V
from tintc.report.reference_render import CONVENTION_LABELS, like_with_like_table
from tests.models import MICRO, tiny_config, tiny_model

GPT2 = GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
OPT_125M = OPTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=768)

# DESIGN §6: the reference code (README settings: D_sim 3072, K 256, 12 TinT heads, 12 layers, 1 step,
# blocks reused), "printed" by its own parameter count, the rest counted module by module on it
DESIGN = {
    "opt": {"printed": 1_669_324_018, "embeddings": 40_183_296, "aux_weights_stored": 170_655_744,
            "as_stored": 1_458_484_978, "dense_every_map": 18_792_883_954,
            "dense_applied_maps": 13_279_774_450, "dense_composed": 9_843_521_266, "blocks_once": 138_473_868},
    "gpt2": {"printed": 1_476_796_914, "embeddings": 39_383_808, "aux_weights_stored": 170_655_744,
             "as_stored": 1_266_757_362, "dense_every_map": 18_601_156_338,
             "dense_applied_maps": 13_088_046_834, "dense_composed": 9_651_793_650, "blocks_once": 120_324_492},
}
CONFIGS = {"opt": OPT_125M, "gpt2": GPT2}


def _shape(family):
    shape, problems = C.SHAPES[family](CONFIGS[family])
    assert problems == []
    return shape


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_the_reference_figures_to_the_unit(family):
    counts = C.reference_counts(_shape(family), C.Settings())
    assert {k: counts[k] for k in DESIGN[family]} == DESIGN[family]
    # its inventory: 217 prefix tensors of K×D_sim, 1,945 maps of which 584 never run, 243 attention
    # modules, 49 MLP-like pairs
    assert (counts["prefix_tensors"], counts["maps"], counts["maps"] - counts["maps_applied"]) == (217, 1945, 584)
    assert (counts["attention_modules"], counts["mlp_pairs"]) == (243, 49)
    assert counts["prefix_tensors"] * 256 * 3072 == counts["aux_weights_stored"]


def test_block_reuse_off_adds_the_final_forward_blocks():
    settings = dataclasses.replace(C.Settings(), reuse_forward=False, reuse_backward=False)
    assert C.reference_counts(_shape("opt"), settings)["printed"] == 2_212_104_610  # DESIGN §6


def test_the_readme_settings_are_the_narrowest_stream_at_k_256():
    assert C.Settings.for_shape(768, 256, 12, 1) == C.Settings()


def test_shapes_the_construction_does_not_take_are_named():
    shape = _shape("gpt2")
    with pytest.raises(ValueError, match=r"d_model 768: K = 100 must divide it"):
        C.reference_counts(shape, C.Settings.for_shape(768, 100, 12, 1))
    odd_ffn = dataclasses.replace(shape, d_ffn=1000)
    assert C.problems(odd_ffn, C.Settings()) == [
        "d_ffn 1000: must be a multiple of d_model 768 (the MLP runs in D-wide chunks)"]
    assert "heads 8" in C.problems(shape, dataclasses.replace(C.Settings(), heads=8))[0]
    post_ln = OPTConfig(**{**OPT_125M.to_dict(), "do_layer_norm_before": False, "word_embed_proj_dim": 512})
    assert [p.split(":")[0] for p in C.SHAPES["opt"](post_ln)[1]] == ["do_layer_norm_before=False",
                                                                    "word_embed_proj_dim 512"]


@pytest.fixture(scope="module")
def micro_gpt2_report():
    compiled = pipeline.compile_tint(tiny_config("gpt2", MICRO, max_length=8), tiny_model("gpt2", table=MICRO))
    return R.parameter_report(compiled)


def test_the_report_puts_like_beside_like(micro_gpt2_report):
    report = micro_gpt2_report
    section = report["reference_counts"]
    assert section["applies"] and section["why_not"] is None
    # the reference's construction at this shape, our K, trained layers and steps
    shape = C.Shape("gpt2", 16, 64, 2, 2, 32, 16, 16, True)
    settings = C.Settings.for_shape(16, 8, 2, 1)
    assert section["settings"] == dataclasses.asdict(settings) and section["shape"] == dataclasses.asdict(shape)
    ref = C.reference_counts(shape, settings)
    sv, conv = report["standard_view"], section["conventions"]
    assert conv["as_stored"] == {"tintc": report["counts"]["unique"]["dense"], "reference": ref["as_stored"],
                                 "ratio": report["counts"]["unique"]["dense"] / ref["as_stored"],
                                 "d_sim": {"tintc": None, "reference": None}}
    outside = sv["reference_convention"]
    assert conv["dense_activations_outside"] == {
        "tintc": outside["dense"]["total"], "reference": ref["dense_applied_maps"],
        "ratio": outside["dense"]["total"] / ref["dense_applied_maps"],
        "d_sim": {"tintc": outside["d_sim"], "reference": settings.width}}
    inside = conv["dense_everything_in_stream"]
    assert (inside["tintc"], inside["reference"], inside["ratio"]) == (sv["ours"]["dense"]["total"], None, None)
    # every key that was there before keeps its place; the new figures are one key at the end
    assert list(report)[-1] == "reference_counts"

    md = V.to_markdown(report)
    title = md.index("## Like with like")
    table = md[title:md.index("\n## ", title + 1)]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")][1:]  # after the header
    ratios = {row[0].lstrip("| ").strip(): row[3].rstrip(" |") for row in rows}
    stored, dense, inside_label = CONVENTION_LABELS.values()
    assert ratios[stored].endswith("×") and ratios[dense].endswith("×")
    assert ratios[inside_label] == ""  # the reference has no such count: no ratio
    assert all(ratio == "" for label, ratio in ratios.items() if label.startswith("reference:"))
    assert f"{ref['printed']:,}" in table and f"{ref['dense_every_map']:,}" in table
    for heading in ("**(1) As stored.**", "**(2) Dense, activations outside the stream**",
                    "**(3) Dense, everything in the stream.**"):
        assert heading in md


def test_families_without_a_reference_construction_say_why():
    compiled = pipeline.compile_tint(tiny_config("llama", MICRO, max_length=8, kinds=["attn_v", "attn_o", "mlp_down"]), tiny_model("llama", table=MICRO))
    report = R.parameter_report(compiled)
    section = report["reference_counts"]
    assert not section["applies"] and section["reference"] is None
    assert section["why_not"].startswith("family llama: gated MLP (SwiGLU), RMSNorm and rotary positions")
    assert all(c["ratio"] is None and c["tintc"] for c in section["conventions"].values())
    md = V.to_markdown(report)
    assert "no figures | family llama: gated MLP" in md


def test_a_k_the_reference_cannot_take_falls_back_to_its_readme_k():
    """At K = 768 (the compact TinT: one weight row per prefix token) the reference's heads would be 768 wide
    and only 4 fit its narrowest stream, fewer than GPT-2's 12: its figures are those at its README's K = 256,
    and the report says so in the table's title."""
    report = {"family": "gpt2", "settings": {"prefixes": 768, "trained_layers": list(range(12)), "steps": 1},
              "counts": {"unique": {"dense": 176_910}},
              "standard_view": {"ours": {"dense": {"total": 7.7e11}, "d_sim": 160_005},
                                "reference_convention": {"dense": {"total": 1.2e10}, "d_sim": 3_076}}}
    section = C.like_with_like(report, GPT2)
    assert section["applies"] and section["settings"]["prefixes"] == 256 and section["settings"]["width"] == 3072
    assert section["own_k"].startswith("at our K = 768 its construction does not apply (n_head 12: must be at most 4")
    assert section["conventions"]["dense_activations_outside"]["reference"] == DESIGN["gpt2"]["dense_applied_maps"]
    title, _, _ = like_with_like_table({"reference_counts": section})
    assert title.endswith("shown at its README's K = 256)")
    report["settings"]["prefixes"] = 256  # where ours applies, nothing is said
    assert C.like_with_like(report, GPT2)["own_k"] is None
