"""lmms_eval entry point: makes `vtc` a known lmms_eval model name (see pyproject.toml).

The harness itself hands lmms_eval a ready model object; the manifest lets lmms_eval's own CLI and
registry list and resolve the class too.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="vtc", simple_class_path="harness.run.requests.VTCModel")
