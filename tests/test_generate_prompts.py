"""Prompt syntax (A1111 weights, BREAK, <lora:> tags), PNG info text, sampler names: no models."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.errors import ForgeError
from loraforge.generate import pnginfo
from loraforge.generate.loras import split_weight
from loraforge.generate.prompts import BREAK_WEIGHT, extract_lora_tags, parse_attention
from loraforge.generate.scenes import round_size, safe_stem
from loraforge.samplers import SAMPLERS, check_sampler


def _weights(text: str) -> list[tuple[str, float]]:
    return [(part, round(weight, 6)) for part, weight in parse_attention(text)]


def test_explicit_round_and_square_weights() -> None:
    assert _weights("a (b:1.2) c") == [("a ", 1.0), ("b", 1.2), (" c", 1.0)]
    assert _weights("(b)") == [("b", 1.1)]
    assert _weights("[b]") == [("b", round(1 / 1.1, 6))]
    assert _weights("a (b:0.5), [c:2]") == [("a ", 1.0), ("b", 0.5), (", ", 1.0),
                                           ("c:2", round(1 / 1.1, 6))]


def test_nesting_multiplies() -> None:
    assert _weights("((b))") == [("b", round(1.1 * 1.1, 6))]
    assert _weights("(a (b:1.5) c:2)") == [("a ", 2.0), ("b", 3.0), (" c", 2.0)]
    assert _weights("[[b]]") == [("b", round(1 / 1.21, 6))]
    assert _weights("([b])") == [("b", 1.0)]


def test_escapes_and_unbalanced_brackets() -> None:
    assert _weights(r"a \(b\) \[c\] d\\e") == [(r"a (b) [c] d\e", 1.0)]
    assert _weights("(open to the end") == [("open to the end", 1.1)]
    assert _weights("closing) only]") == [("closing) only]", 1.0)]
    assert _weights("ratio 16:9 (x:1.3)") == [("ratio 16:9 ", 1.0), ("x", 1.3)]
    assert _weights("") == [("", 1.0)]


def test_break_is_its_own_segment() -> None:
    parts = parse_attention("a red knight BREAK a blue mage")
    assert parts == [("a red knight", 1.0), ("BREAK", BREAK_WEIGHT), ("a blue mage", 1.0)]
    assert parse_attention("BREAKFAST")[0] == ("BREAKFAST", 1.0)


def test_lora_tags_are_taken_out_of_the_prompt() -> None:
    text, tags = extract_lora_tags("<lora:blake_v2:0.8>, a knight, <lora:style>")
    assert text == "a knight"
    assert [(t.name, t.weight) for t in tags] == [("blake_v2", 0.8), ("style", None)]
    with pytest.raises(ValueError, match="not a number"):
        extract_lora_tags("<lora:x:abc>")
    assert extract_lora_tags("no tags (x:1.2)") == ("no tags (x:1.2)", [])


def test_lora_argument_weight_split() -> None:
    assert split_weight("runs/a.safetensors:0.8") == ("runs/a.safetensors", 0.8)
    assert split_weight("blake_v2") == ("blake_v2", None)
    assert split_weight("x.safetensors:-1") == ("x.safetensors", -1.0)


def test_parameters_text_round_trips() -> None:
    fields = {"Steps": 25, "Sampler": "DPM++ 2M Karras", "CFG scale": "7.5", "Seed": 1234,
              "Size": "768x576", "Model hash": "0123456789", "Model": "AnyLoRA",
              "Clip skip": 2, "ControlNet 0": "Module: none, Model: cn [abcd1234], Weight: 1.0",
              "Lora hashes": "blake: 0123456789ab, style: ba9876543210",
              "Version": "loraforge 0.1.0"}
    text = pnginfo.format_parameters("a knight, (red:1.2)\nsecond line",
                                     'lowres, "bad" hands', fields)
    parsed = pnginfo.parse_parameters(text)
    assert parsed["prompt"] == "a knight, (red:1.2)\nsecond line"
    assert parsed["negative_prompt"] == 'lowres, "bad" hands'
    assert parsed["Steps"] == 25 and parsed["Seed"] == 1234 and parsed["CFG scale"] == 7.5
    assert parsed["Model hash"] == "0123456789"  # digits stay text
    assert (parsed["width"], parsed["height"]) == (768, 576)
    assert parsed["ControlNet 0"] == fields["ControlNet 0"]
    assert parsed["lora_hashes"] == [("blake", "0123456789ab"), ("style", "ba9876543210")]
    # a file named twice is listed once; two files of one name keep an entry each
    assert pnginfo.format_lora_hashes([("blake", "01"), ("blake", "01"), ("blake", "ba")]) == \
        "blake: 01, blake: ba"
    assert parsed["Version"] == "loraforge 0.1.0"
    no_negative = pnginfo.parse_parameters(pnginfo.format_parameters("cat", "", fields))
    assert no_negative["prompt"] == "cat" and no_negative["negative_prompt"] == ""


def test_parameters_chunk_in_a_png(tmp_path: Path) -> None:
    from PIL import Image

    text = pnginfo.format_parameters("ünïcode prompt", "", {"Steps": 1, "Seed": 2,
                                                            "Size": "8x8"})
    path = tmp_path / "x.png"
    pnginfo.save_png(Image.new("RGB", (8, 8)), path, text)
    assert pnginfo.read_parameters(path) == text
    assert not list(tmp_path.glob(".*tmp"))


def test_sampler_names() -> None:
    for name in ("DPM++ 2M Karras", "Euler a", "Euler", "DDIM", "UniPC", "DPM++ SDE Karras"):
        assert name in SAMPLERS
        assert check_sampler(name.lower()) == name
    with pytest.raises(ForgeError) as info:
        check_sampler("Euler b")
    assert "DPM++ 2M Karras" in str(info.value) and "Euler a" in str(info.value)


def test_sizes_and_names() -> None:
    assert round_size(770, 573) == (768, 576)
    assert round_size(64, 64) == (64, 64)
    assert safe_stem("Beach / sunset: 2!") == "Beach_sunset_2"
    assert safe_stem("../..") == "scene"
    assert safe_stem("ok-name_1.2") == "ok-name_1.2"
    # Letters of any script are kept (NFC); what is unsafe in a file name, in A1111 or
    # ComfyUI (separators, reserved, control and invisible characters) is not.
    assert [safe_stem(name) for name in ("市場", "公園", "café", "cafe\u0301", "नमस्ते")] == \
        ["市場", "公園", "café", "café", "नमस्ते"]
    assert safe_stem('a<b>c:d"e|f?g*h\\i') == "a_b_c_d_e_f_g_h_i"
    assert safe_stem("x\x00y\tz\u202ew\u200b.png") == "x_y_z_w_.png"
    assert safe_stem(".市場 ") == "市場" and safe_stem("🎉") == "scene"
    long = safe_stem("市" * 100)
    assert long == "市" * 53 and len(long.encode()) <= 160
