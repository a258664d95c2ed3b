"""What `dataset check` adds about captions and pictures: captions without the trigger, tags
in every caption of a concept (the trigger absorbs them), and near-duplicate pictures."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from loraforge.dataset.caption_edit import tag_key
from loraforge.dataset.dedupe import DEFAULT_DISTANCE, hash_pictures, near_duplicate_groups
from loraforge.dataset.folders import ConceptFolder
from loraforge.dataset.scan import Concept, Dataset

MAX_NAMED_TAGS = 6


@dataclass
class Curation:
    advice: list[str] = field(default_factory=list)
    near_duplicates: int = 0
    near_duplicate_groups: int = 0
    warnings: list[str] = field(default_factory=list)


def _trigger_advice(concept: Concept) -> str | None:
    captioned = [image for image in concept.images if image.captioned]
    lacking = [image for image in captioned
               if tag_key(concept.name) not in {tag_key(t) for t in image.separate_tags}]
    if not lacking:
        return None
    return (f"{concept.name}: {len(lacking)} of {len(captioned)} captions lack the trigger "
            f"'{concept.name}' (e.g. {lacking[0].path.with_suffix('').name}), so those "
            f"pictures do not teach it: loraforge dataset tags --add-trigger "
            f"{shlex.quote(concept.name)}")


def _absorbed_advice(concept: Concept) -> str | None:
    if concept.captioned < 2 or concept.captioned < concept.num_images:
        return None
    sets = [{tag_key(t) for t in image.separate_tags} for image in concept.images]
    common = set.intersection(*sets) - {tag_key(concept.name)}
    if not common:
        return None
    first = concept.images[0].separate_tags  # in caption order, as written
    names = [t for t in dict.fromkeys(first) if tag_key(t) in common]
    shown = ", ".join(f"'{t}'" for t in names[:MAX_NAMED_TAGS])
    more = f" and {len(names) - MAX_NAMED_TAGS} more" if len(names) > MAX_NAMED_TAGS else ""
    return (f"{concept.name}: {shown}{more} {'is' if len(names) == 1 else 'are'} in every "
            f"caption, so training absorbs {'it' if len(names) == 1 else 'them'} into the "
            f"trigger '{concept.name}' (it will bring {'it' if len(names) == 1 else 'them'} "
            "without being asked); fine for traits the character always has, else leave "
            "some pictures without: loraforge dataset tags shows the counts")


def curate(dataset: Dataset, caption_extension: str, distance: int = DEFAULT_DISTANCE,
           regularisation: frozenset[str] = frozenset()) -> Curation:
    """The advice for every concept, and the near-duplicate count over the whole dataset.
    Concepts named in `regularisation` (is_reg) teach no trigger, so get no trigger advice."""
    result = Curation()
    for concept in dataset.concepts:
        if concept.name in regularisation:
            continue
        result.advice += [a for a in (_trigger_advice(concept), _absorbed_advice(concept)) if a]
    folders = [ConceptFolder(c.name, c.folder, [image.path for image in c.images])
               for c in dataset.concepts]
    groups = near_duplicate_groups(hash_pictures(folders, caption_extension, result.warnings),
                                   distance)
    result.near_duplicates = sum(len(group) - 1 for group in groups)
    result.near_duplicate_groups = len(groups)
    if groups:
        result.advice.append(
            f"{result.near_duplicates} near-duplicate picture(s) in {len(groups)} group(s), "
            f"each a picture to keep and those within {distance} bits of its perceptual hash "
            "and of about its colours: each copy weighs as another picture; "
            "see them with `loraforge dataset dedupe`, move the extras aside with "
            "`loraforge dataset dedupe --move`")
    return result
