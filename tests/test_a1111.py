"""What A1111 reads from our files: the PNG `parameters` text pasted into its prompt box, and
the LoRA's `ss_*` metadata as kohya writes it."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import write_training_project

from loraforge.config import load_settings
from loraforge.dataset.scan import scan_dataset
from loraforge.generate import pnginfo
from loraforge.generate.prompts import extract_lora_tags
from loraforge.samplers import SAMPLERS, infotext_sampler
from loraforge.train.metadata import TrainingFacts, lora_metadata


def test_prompt_carries_a_lora_tag_for_each_lora_used() -> None:
    text = pnginfo.prompt_with_loras("a (red:1.2) knight, BREAK castle",
                                     [("blake", 0.7), ("style_v2", 1.0), ("neg", -0.25)])
    assert text == ("a (red:1.2) knight, BREAK castle <lora:blake:0.7> <lora:style_v2:1> "
                    "<lora:neg:-0.25>")
    clean, tags = extract_lora_tags(text)  # read back as A1111's syntax reads it
    assert clean == "a (red:1.2) knight, BREAK castle"
    assert [(t.name, t.weight) for t in tags] == [("blake", 0.7), ("style_v2", 1.0),
                                                  ("neg", -0.25)]
    assert pnginfo.prompt_with_loras("a mage ", []) == "a mage"


def test_sampler_is_written_in_the_a1111_1_9_form_and_read_back() -> None:
    assert infotext_sampler("DPM++ 2M Karras") == ("DPM++ 2M", "Karras")
    assert infotext_sampler("DPM++ SDE Karras") == ("DPM++ SDE", "Karras")
    assert infotext_sampler("Euler a") == ("Euler a", "Automatic")
    for name in SAMPLERS:
        sampler, schedule = infotext_sampler(name)
        assert "Karras" not in sampler
        text = pnginfo.format_parameters("cat", "", {"Steps": 20, "Sampler": sampler,
                                                      "Schedule type": schedule,
                                                      "CFG scale": "7.0", "Seed": 1})
        assert f"Sampler: {sampler}, Schedule type: {schedule}, CFG scale" in text
        assert pnginfo.parse_parameters(text)["sampler"] == name


def test_network_args_are_left_out_of_a_plain_lora(tmp_path: Path) -> None:
    config = write_training_project(tmp_path, tmp_path / "no-models-needed")
    dataset = scan_dataset(tmp_path / "master_dataset")
    facts = TrainingFacts("run", "session", 0.0, "base", "0" * 64, "0" * 8, "AdamW", 6, 3, 2, 2,
                          1.0, 0, "no", True, {})

    plain = lora_metadata(load_settings(config), dataset, facts, 6, 3, 1.0)
    assert "ss_network_args" not in plain and plain["ss_network_dim"] == "4"
    locon = lora_metadata(load_settings(config, ["train.conv_dim=4", "train.conv_alpha=2"]),
                          dataset, facts, 6, 3, 1.0)
    assert json.loads(locon["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2.0"}
    assert all(isinstance(value, str) for value in locon.values())
