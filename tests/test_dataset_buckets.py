"""Bucket counts in `loraforge dataset check`: what training will do, shown before it starts."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli
from PIL import Image


def test_check_shows_buckets_and_counts_single_bucket_batches(tmp_path: Path) -> None:
    concept = tmp_path / "master_dataset" / "3_blake"
    concept.mkdir(parents=True)
    for name, size in (("square", (512, 512)), ("wide", (768, 512)), ("tall", (512, 768)),
                       ("square2", (600, 600))):
        Image.new("RGB", size, (120, 80, 40)).save(concept / f"{name}.png")
    (tmp_path / "forge.toml").write_text("[train]\nbatch_size = 2\nepochs = 1\n")
    result = run_cli("dataset", "check", "--json", "--config", tmp_path / "forge.toml")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["concepts"][0]["buckets"] == {"384x640": 1, "512x512": 2, "640x384": 1}
    # 12 draws: 6 square (3 batches), 3 wide (2 batches), 3 tall (2 batches), never mixed
    assert summary["totals"]["steps_per_epoch"] == 7
    table = run_cli("dataset", "check", "--config", tmp_path / "forge.toml")
    assert "buckets of blake: 384x640 (1), 512x512 (2), 640x384 (1)" in table.stdout


def test_buckets_are_counted_per_folder_when_two_folders_share_a_concept(tmp_path: Path,
                                                                         ) -> None:
    for folder, count in (("10_bob", 1), ("3_bob", 3)):
        concept = tmp_path / "master_dataset" / folder
        concept.mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (512, 512), (120, 80, 40 + i)).save(concept / f"{i}.png")
    (tmp_path / "forge.toml").write_text("[train]\nbatch_size = 2\nepochs = 1\n")
    result = run_cli("dataset", "check", "--json", "--config", tmp_path / "forge.toml")
    assert result.returncode == 0, result.stderr
    found = {c["folder"]: c["buckets"] for c in json.loads(result.stdout)["concepts"]}
    assert found == {"10_bob": {"512x512": 1}, "3_bob": {"512x512": 3}}
