"""Staging and pushing (DESIGN.md section 3).

    targets.py   where a written path goes, and the name rules of writing (pure)
    staging.py   staged files on disk and the recovery record beside each; fragments
    streaming.py uploads that start while a big file is written in order, finished at close
    overlay.py   what this mount holds locally: staged files, mkdir'ed directories, one lock
    edits.py     pure layer edits, and the per-tag editor (batched PUTs, checked afterwards)
    dockermodel.py  tags of Docker's model type: media types by name, file checks, the config
    push.py      pushing a staged file (layer or Helm chart), background retries
    writer.py    the write verbs, on nodes the view resolved
"""

from .staging import Fragment, StagedFile
from .targets import LocalDir, Parent
from .writer import WriteHandle, Writer

__all__ = ["Fragment", "LocalDir", "Parent", "StagedFile", "WriteHandle", "Writer"]
