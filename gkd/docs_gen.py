"""Generates ``docs/recipes.md`` from the config dataclass, so the field reference never drifts.

Run ``python -m gkd.docs_gen > docs/recipes.md``; a test checks the file is current.
"""

from __future__ import annotations

import dataclasses
import json

from gkd.config import GKDConfig

HEADER = """# Recipe fields

A recipe is a YAML mapping of these fields; any field can also be given on the command line as
`key=value` (parsed as YAML: `lmbda=1`, `seq_kd=true`, `teacher=null`). Unknown keys are errors
that name the closest valid key. This page is generated from `gkd/config.py`
(`python -m gkd.docs_gen > docs/recipes.md`); `gkd train --help-config` prints the same.

Several teachers in one run (routing; docs/concepts.md, "Several teachers"): each row names its teacher
in `teacher_column`, and rows without it go to `default_teacher`:

```yaml
teachers: {general: builtin:smollm2-135m-instruct, arith: runs/two-teachers/arith-specialist/final}
default_teacher: general
# a row: {"messages": [{"role": "user", "content": "What is 737 + 361?"}], "teacher": "arith"}
```

A worked example: `recipes/smollm2-135m-two-teachers.yaml` (a pruned SmolLM2 distilled from SmolLM2-135M-Instruct
and an arithmetic specialist made from it by `recipes/smollm2-135m-arith-specialist.yaml`); the whole
comparison with the generalist alone: `python benchmarks/two_teachers.py` (docs/results.md, "Two teachers in one
run").

Each local teacher is loaded once (memory: the sum of their weights); one that does not fit goes in
another process with `gkd serve-teacher` and is named by its URL (`remote: http://host:8000`).

| field | default | meaning |
|---|---|---|
"""


def render() -> str:
    rows = []
    for f in dataclasses.fields(GKDConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{json.dumps(default)}` | {help_text} |")
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render(), end="")
