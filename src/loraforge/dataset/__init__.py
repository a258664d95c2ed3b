"""The training dataset: `master_dataset/<repeats>_<concept>/` images and captions.

- `images`: the one image loader (`load_image`) and the check's probe (`probe_image`).
- `scan`: folders -> `Dataset` of `Concept`s and `ImageRecord`s; every problem in one error.
- `check`: `loraforge dataset check` (summary table / JSON, steps, advice).
- `sample`: a small drawn two-concept dataset for the demo.
- The dataset maker (`dataset tag|tags|dedupe`, wired in `command`): `folders` (a lenient
  listing), `tagger` (WD14 tagging), `caption_edit` (tag-level edits, diffs, backups),
  `tag_list` (frequencies, bulk edits), `dedupe` (perceptual hashes), `curation` (the check's
  advice about triggers, absorbed tags and near-duplicates).

Nothing is imported here, so `import loraforge.dataset.scan` stays cheap.
"""
