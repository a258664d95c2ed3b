"""The training dataset: `master_dataset/<repeats>_<concept>/` images and captions.

- `images`: the one image loader (`load_image`) and the check's probe (`probe_image`).
- `scan`: folders -> `Dataset` of `Concept`s and `ImageRecord`s; every problem in one error.
- `check`: `loraforge dataset check` (summary table / JSON, steps, advice).
- `sample`: a small drawn two-concept dataset for the demo.

Nothing is imported here, so `import loraforge.dataset.scan` stays cheap.
"""
