"""Captions as tags: keep_tokens, the separator, shuffling, dropout, prefix/suffix, seeded draws."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from loraforge.dataset.tags import (
    TagPolicy,
    caption_can_change,
    example_rng,
    render_caption,
    split_kept,
    warn_short_captions,
)

TAGS = ["blake", "1girl", "red hat", "smiling", "outdoors", "looking at viewer"]


def _tags(caption: str) -> list[str]:
    return caption.split(", ") if caption else []


def test_keep_first_tag_while_shuffling() -> None:
    policy = TagPolicy(shuffle=True, keep_tokens=1)
    orders = set()
    for index in range(100):
        tags = _tags(render_caption(TAGS, policy, example_rng(42, 0, index)))
        assert tags[0] == "blake"
        assert sorted(tags[1:]) == sorted(TAGS[1:])
        orders.add(tuple(tags))
    assert len(orders) > 50  # really shuffled


def test_no_policy_is_identity_and_text_works_too() -> None:
    rng = random.Random(0)
    assert render_caption(TAGS, TagPolicy(), rng) == ", ".join(TAGS)
    assert render_caption("blake,1girl,\nred hat , ,smiling", TagPolicy(), rng) == \
        "blake, 1girl, red hat, smiling"
    assert render_caption([], TagPolicy(), rng) == ""


def test_keep_tokens_separator() -> None:
    caption = "blake, 1girl ||| red hat, smiling, outdoors"
    assert split_kept(caption, keep_tokens=0) == (["blake", "1girl"],
                                                 ["red hat", "smiling", "outdoors"], [])
    # the separator overrides keep_tokens, and never reaches the output
    policy = TagPolicy(shuffle=True, keep_tokens=4, tag_dropout_rate=0.5)
    for index in range(100):
        caption_out = render_caption(caption, policy, example_rng(1, 2, index))
        assert "|||" not in caption_out
        tags = _tags(caption_out)
        assert tags[:2] == ["blake", "1girl"]
        assert set(tags[2:]) <= {"red hat", "smiling", "outdoors"}
    # a separator inside a list of tags works as in text; a second one keeps a tail
    tail = ["blake |||", "red hat", "smiling", "||| masterpiece"]
    assert split_kept(tail, keep_tokens=0) == (["blake"], ["red hat", "smiling"], ["masterpiece"])
    for index in range(20):
        tags = _tags(render_caption(tail, TagPolicy(shuffle=True), example_rng(0, 0, index)))
        assert tags[0] == "blake" and tags[-1] == "masterpiece"
    # without a separator, keep_tokens applies
    assert split_kept(TAGS, keep_tokens=2) == (TAGS[:2], TAGS[2:], [])


def test_caption_dropout_rate() -> None:
    policy = TagPolicy(shuffle=True, keep_tokens=1, caption_dropout_rate=0.3,
                       caption_prefix="masterpiece")
    results = [render_caption(TAGS, policy, example_rng(7, 0, i)) for i in range(2000)]
    dropped = sum(1 for r in results if r == "") / len(results)
    assert 0.26 <= dropped <= 0.34
    assert all(r.startswith("masterpiece, blake, ") for r in results if r)


def test_tag_dropout_rate_per_tag() -> None:
    policy = TagPolicy(keep_tokens=1, tag_dropout_rate=0.3)
    kept: Counter[str] = Counter()
    draws = 2000
    for i in range(draws):
        tags = _tags(render_caption(TAGS, policy, example_rng(3, 1, i)))
        assert tags[0] == "blake"  # the kept tag is never dropped
        assert tags[1:] == [t for t in TAGS[1:] if t in tags]  # no shuffle: order kept
        kept.update(tags)
    assert kept["blake"] == draws
    for tag in TAGS[1:]:
        assert 0.26 <= 1 - kept[tag] / draws <= 0.34, tag


def test_prefix_and_suffix() -> None:
    rng = random.Random(0)
    policy = TagPolicy(caption_prefix="masterpiece, best quality,", caption_suffix=" , 4k ")
    assert render_caption(["blake", "1girl"], policy, rng) == \
        "masterpiece, best quality, blake, 1girl, 4k"
    # keep_tokens counts the caption's own tags, not the prefix
    shuffled = TagPolicy(shuffle=True, keep_tokens=1, caption_prefix="masterpiece")
    for index in range(20):
        tags = _tags(render_caption(TAGS, shuffled, example_rng(0, 0, index)))
        assert tags[:2] == ["masterpiece", "blake"]
    assert render_caption([], TagPolicy(caption_prefix="a", caption_suffix="b"), rng) == "a, b"


def test_render_is_deterministic_given_rng() -> None:
    policy = TagPolicy(shuffle=True, keep_tokens=1, tag_dropout_rate=0.2,
                       caption_dropout_rate=0.1)
    first = [render_caption(TAGS, policy, example_rng(42, 3, i)) for i in range(50)]
    again = [render_caption(TAGS, policy, example_rng(42, 3, i)) for i in range(50)]
    other_epoch = [render_caption(TAGS, policy, example_rng(42, 4, i)) for i in range(50)]
    assert first == again
    assert first != other_epoch


def test_example_rng_is_stable_and_distinct() -> None:
    # a fixed value: the derivation must never change, or resumed runs would see other captions
    assert example_rng(42, 0, 0).random() == example_rng(42, 0, 0).random()
    assert example_rng(42, 0, 0).getrandbits(64) == 0x65C1C4368FC6E630
    draws = {example_rng(s, e, i).random() for s in (1, 2) for e in (0, 1) for i in (0, 1)}
    assert len(draws) == 8
    assert example_rng(1, 0, 0, "crop").random() != example_rng(1, 0, 0, "caption").random()
    state = random.getstate()
    example_rng(1, 2, 3).random()
    assert random.getstate() == state


def test_short_caption_warning_once_per_concept() -> None:
    concepts = {
        "blake": [["blake", "1girl", "red hat"], ["blake"], ["blake", "solo"], ["blake"]],
        "rex": [["rex", "dog", "sitting"], ["rex", "dog", "running", "park"]],
        "mia": [["mia ||| smiling"], "mia, 1girl, hat"],
    }
    warnings = {name: warn_short_captions(name, caps, keep_tokens=3)
                for name, caps in concepts.items()}
    assert warnings["rex"] is None
    assert warnings["mia"] is None  # the separator overrides keep_tokens for the short one
    text = warnings["blake"]
    assert isinstance(text, str) and "\n" not in text
    assert "'blake'" in text and "3 of 4 captions" in text and "shortest has 1" in text
    assert warn_short_captions("blake", concepts["blake"], keep_tokens=0) is None
    assert "1 of 1 captions has" in (warn_short_captions("x", [["x"]], 2) or "")


def test_caption_can_change() -> None:
    assert not caption_can_change(TagPolicy())
    assert not caption_can_change(TagPolicy(keep_tokens=2, flip_aug=True, caption_prefix="a"))
    assert caption_can_change(TagPolicy(shuffle=True))
    assert caption_can_change(TagPolicy(caption_dropout_rate=0.05))
    assert caption_can_change(TagPolicy(tag_dropout_rate=0.1))


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="keep_tokens"):
        TagPolicy(keep_tokens=-1)
    with pytest.raises(ValueError, match="caption_dropout_rate"):
        TagPolicy(caption_dropout_rate=1.5)
    with pytest.raises(ValueError, match="tag_dropout_rate"):
        TagPolicy(tag_dropout_rate=-0.1)
