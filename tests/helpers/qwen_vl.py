"""The stock qwen_vl_utils video code (what lmms_eval's Qwen models call), read from its installed
source with torchvision's resize replaced by the same tensor operations, for the Qwen adapters'
pipeline-equality tests (tests/test_qwen2_5_vl.py, tests/test_qwen3_vl.py)."""

from __future__ import annotations

import ast
import importlib.util
import types
from pathlib import Path

import torch

QWEN_VL_UTILS_NAMES = {
    "MAX_RATIO", "SPATIAL_MERGE_SIZE", "IMAGE_MIN_TOKEN_NUM", "IMAGE_MAX_TOKEN_NUM", "VIDEO_MIN_TOKEN_NUM",
    "VIDEO_MAX_TOKEN_NUM", "FPS", "FRAME_FACTOR", "FPS_MIN_FRAMES", "FPS_MAX_FRAMES", "MODEL_SEQ_LEN",
    "MAX_NUM_WORKERS_FETCH_VIDEO", "logger", "round_by_factor", "ceil_by_factor", "floor_by_factor",
    "smart_resize", "smart_nframes", "calculate_video_frame_range", "_read_video_decord", "fetch_video"}


def compile_source(origin: str, keep: set[str], namespace: dict, drop_imports=("torchvision",)) -> dict:
    """The top-level functions/assignments `keep` of the Python file `origin`, executed in `namespace`
    (imports of `drop_imports` removed; None: every import, `namespace` provides the names)."""
    tree = ast.parse(Path(origin).read_text())
    body = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if drop_imports is None or any(n and n.split(".")[0] in drop_imports for n in names):
                continue
            body.append(node)
        elif isinstance(node, ast.FunctionDef) and node.name in keep:
            body.append(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in keep for t in node.targets):
            body.append(node)
    exec(compile(ast.Module(body=body, type_ignores=[]), origin, "exec"), namespace)
    return namespace


def torchvision_v1_resize(img, size, interpolation="bilinear", antialias=True):
    """torchvision.transforms.functional.resize on a uint8 tensor (its _functional_tensor path)."""
    out = torch.nn.functional.interpolate(img.float(), size=size, mode=interpolation, align_corners=False,
                                          antialias=antialias)
    return out.clamp(0, 255).round().to(img.dtype)


def qwen_vl_utils_namespace() -> dict:
    """qwen_vl_utils' vision_process.py (QWEN_VL_UTILS_NAMES), reading videos with decord."""
    origin = importlib.util.find_spec("qwen_vl_utils").submodule_search_locations[0] + "/vision_process.py"
    functional = types.SimpleNamespace(resize=lambda video, size, interpolation, antialias: torchvision_v1_resize(
        video, size, interpolation, antialias))
    namespace = {"transforms": types.SimpleNamespace(functional=functional),
                 "InterpolationMode": types.SimpleNamespace(BICUBIC="bicubic")}
    ns = compile_source(origin, QWEN_VL_UTILS_NAMES, namespace)
    ns["get_video_reader_backend"] = lambda: "decord"
    ns["VIDEO_READER_BACKENDS"] = {"decord": ns["_read_video_decord"]}
    return ns
